"""Process-group set-up and the parallel layout checks that must pass before any work."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_midtrain.errors import UserError


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    pp: int
    cp: int
    dp: int
    rank: int
    local_rank: int


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_layout(cfg, world: int) -> int:
    """Validate TP/PP/CP against the world size and the model; return the DP size.

    Runs before ``init_process_group`` so a bad layout fails fast on every rank with
    the same one-line message.
    """
    p, m = cfg.parallel, cfg.model
    model_parallel = p.tp * p.pp * p.cp
    if world % model_parallel:
        raise UserError(
            f"parallel.tp*pp*cp = {p.tp}*{p.pp}*{p.cp} = {model_parallel} does not divide the world size {world}",
            f"launch a multiple of {model_parallel} processes or change parallel.tp/pp",
        )
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % p.tp or groups % p.tp:
        raise UserError(
            f"parallel.tp={p.tp} does not divide the attention heads ({m.num_attention_heads}) "
            f"and KV groups ({groups})",
            "choose parallel.tp that divides both",
        )
    from megatron_midtrain.model.builder import padded_vocab_size

    if padded_vocab_size(m, 1) % p.tp:
        raise UserError(
            f"the padded vocabulary ({padded_vocab_size(m, 1)}) does not split across parallel.tp={p.tp}",
            "set model.make_vocab_size_divisible_by to a multiple of parallel.tp",
        )
    if m.ffn_hidden_size % p.tp:
        raise UserError(f"parallel.tp={p.tp} does not divide model.ffn_hidden_size={m.ffn_hidden_size}", "change parallel.tp")
    if m.num_layers % p.pp:
        raise UserError(
            f"parallel.pp={p.pp} does not divide model.num_layers={m.num_layers}",
            "choose parallel.pp that divides the number of layers",
        )
    if p.distributed_optimizer and not torch.cuda.is_available():
        raise UserError(
            "parallel.distributed_optimizer=true needs CUDA (megatron's DistributedOptimizer checks for CUDA tensors)",
            "set parallel.distributed_optimizer=false on the CPU",
        )
    if cfg.reference.fp8 and not torch.cuda.is_available():
        raise UserError("reference.fp8=true needs a GPU with Transformer Engine", "set reference.fp8=false on the CPU")
    return world // model_parallel


def model_parallel_layout() -> tuple[int, int, int] | None:
    """(TP, PP, CP) of megatron's model-parallel groups in this process, None if there are none."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_context_parallel_world_size())


def init_process_groups(tp: int = 1, pp: int = 1, cp: int = 1, backend: str = "auto", *, share_threads: bool = True) -> None:
    """The one process-group set-up: torch.distributed and megatron's TP/PP/CP groups.

    * SLURM task variables become torchrun's (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*);
    * :func:`megatron_midtrain.utils.cpu_compat.activate` (megatron-core on the CPU);
    * torch.distributed: from the torchrun environment, or, when ``MASTER_ADDR`` is unset (a
      plain ``python`` process), a single local process on a free port (the environment is
      left as it is); an existing process group is reused;
    * on the CPU (``share_threads``), each rank takes its share of the cores as intra-op threads;
    * megatron's model-parallel groups, or the existing ones when they have this layout (a
      previous Trainer or tool in this process); another layout is a :class:`UserError`.

    ``backend``: ``auto`` (NCCL with CUDA, else gloo), ``nccl`` or ``gloo``.
    """
    from megatron.core import parallel_state

    from megatron_midtrain.utils import cpu_compat
    from megatron_midtrain.utils.slurm_env import torchrun_env_from_slurm

    os.environ.update(torchrun_env_from_slurm(os.environ))
    world = world_size_from_env()
    cpu_compat.activate()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=30)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:  # plain `python ...`: one local process; no RANK/WORLD_SIZE/MASTER_* needed or changed
            from megatron_midtrain.utils.net import free_port

            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                    timeout=timeout)
    if share_threads and not torch.cuda.is_available():
        # Ranks share the CPU cores; one intra-op thread per rank avoids oversubscription.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world)))))
    have = model_parallel_layout()
    if have is None:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 context_parallel_size=cp)
    elif have != (tp, pp, cp):
        raise UserError(f"this process already has process groups for TP{have[0]} PP{have[1]} CP{have[2]}, "
                        f"this run needs TP{tp} PP{pp} CP{cp}", "run it in its own process")


def init_distributed(cfg) -> Layout:
    """Check ``cfg.parallel`` against the world and the model, then :func:`init_process_groups`."""
    from megatron_midtrain.utils.slurm_env import torchrun_env_from_slurm

    os.environ.update(torchrun_env_from_slurm(os.environ))
    world = world_size_from_env()
    dp = check_layout(cfg, world)
    p = cfg.parallel
    # Groups left by a previous Trainer in this process (demo model stages, tests) are reused.
    init_process_groups(p.tp, p.pp, p.cp, p.backend)
    return Layout(world=world, tp=p.tp, pp=p.pp, cp=p.cp, dp=dp, rank=dist.get_rank(),
                  local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def broadcast_object(obj, src: int = 0):
    """Broadcast a picklable object from ``src`` to every rank (identity when not distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
