"""Stop every rank when rank 0 no longer holds ``<run dir>/run.lock`` (training/run_lock.py).

Rank 0's heartbeat thread keeps the lock fresh; this callback, first in the trainer's list,
checks at each step end that the lock file is still ours (removed by hand, or taken over by a
launch that judged this run dead) and broadcasts the answer, so that every rank stops with the
same error before any writer (metrics.jsonl, checkpoints, plots) touches the run dir again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_midtrain.callbacks.base import Callback
from megatron_midtrain.errors import UserError


class RunLockGuard(Callback):
    def on_step_end(self, trainer, record: dict) -> None:
        lock = trainer.run_lock
        lost = lock is not None and not lock.owned()
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1.0 if lost else 0.0], device=trainer.device)
            dist.broadcast(flag, src=0)
            lost = bool(flag.item())
        if lost:
            trainer.lock_lost = True
            if lock is not None:
                lock.ensure_held()  # raises, naming who holds the run dir now
            raise UserError(f"rank 0 no longer holds the lock on {trainer.run_dir}; stopping without writing more",
                            "run one process per run.dir")
