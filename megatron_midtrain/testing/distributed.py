"""Run a function on N ranks: gloo on the CPU, NCCL on GPUs.

One helper for every distributed test. Each rank gets the usual torchrun
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) so code under test
initialises exactly as it would under ``torchrun``. A failure on any rank is
re-raised in the parent with that rank's traceback.
"""

from __future__ import annotations

import os
import pickle
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from megatron_midtrain.utils.net import free_port  # noqa: F401  (tests import it from here)


def _worker(rank: int, world_size: int, port: int, backend: str, fn, args, kwargs, queue):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    # Two CPU cores are shared by all ranks: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        result = fn(*args, **kwargs)
        # Plain pickle copies tensors by value; torch's queue reducers would pass shared-memory
        # handles that vanish when this process exits before the parent reads them.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args,
    backend: str | None = None,
    timeout_s: float = 600.0,
    **kwargs,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` processes; return per-rank results.

    ``fn`` must be importable (module level) and its return value picklable. It is
    responsible for initialising ``torch.distributed`` (the training code does).
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, kwargs, queue), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    import time

    deadline = time.monotonic() + timeout_s
    while len(results) + len(errors) < world_size:
        if time.monotonic() > deadline:
            break
        if queue.empty():
            if not any(p.is_alive() for p in procs) and queue.empty():
                break
            time.sleep(0.05)
            continue
        rank, status, payload = queue.get()
        if status == "ok":
            results[rank] = pickle.loads(payload)
        else:
            errors.append(f"rank {rank} failed:\n{payload}")
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    if len(results) != world_size:
        codes = [p.exitcode for p in procs]
        raise RuntimeError(f"distributed run did not finish: {len(results)}/{world_size} results, exit codes {codes}")
    return [results[r] for r in range(world_size)]
