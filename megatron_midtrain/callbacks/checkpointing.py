"""When to checkpoint and when to stop: ``train.save_interval``, the last step, ``train.exit_at_step``, signals."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from megatron_midtrain.callbacks.base import Callback
from megatron_midtrain.training import checkpoint as ckpt


class SignalStop(Callback):
    """SIGTERM / SIGUSR1 (SLURM's pre-emption warning) ask for a stop: every rank learns of it
    at the end of the step (a MAX all-reduce of the flag), the step is checkpointed and the
    loop ends; rerunning the same command resumes."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):  # noqa: ARG002
        self.requested = True

    def on_train_start(self, trainer) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_step_end(self, trainer, record: dict) -> None:
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = flag.to(trainer.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and trainer.stop_reason is None:
            trainer.stop_reason = "stop signal received"

    def close(self, trainer) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Checkpointing(Callback):
    """Saves every ``save_interval`` steps (0: never in between), at ``max_steps`` and whenever
    the loop is about to stop; ``exit_at_step`` stops the run after that step (e.g. to fit a
    job's time limit). Old checkpoints beyond ``train.keep_checkpoints`` are pruned by the save.
    With ``train.async_save`` a save whose writes have all finished is completed between steps."""

    def __init__(self, save_interval: int, max_steps: int, exit_at_step: int | None):
        self.save_interval = save_interval
        self.max_steps = max_steps
        self.exit_at_step = exit_at_step

    def on_step_end(self, trainer, record: dict) -> None:
        step = record["step"]
        if self.exit_at_step is not None and step >= self.exit_at_step and trainer.stop_reason is None:
            trainer.stop_reason = f"train.exit_at_step={self.exit_at_step}"
        if (self.save_interval and step % self.save_interval == 0) or step == self.max_steps or trainer.stop_reason:
            trainer.save()
        else:
            ckpt.poll_async_saves()
