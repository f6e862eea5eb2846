"""GRPO's greedy held-out accuracy (``rl/heldout_accuracy``), before training and every eval interval."""

from __future__ import annotations

from megatron_midtrain.callbacks.base import Callback
from megatron_midtrain.training.runtime import log0


class HeldOutAccuracy(Callback):
    """Greedy exact-match accuracy on ``method.eval_problems`` held-out problems, measured by the
    method's step (``trainer.method_step.heldout_accuracy()``, collective): once before the first
    step of a fresh run (logged with step 1 as ``rl/heldout_accuracy_before``), then every
    ``train.eval_interval`` steps and at the last step. Declared by the GRPO method."""

    def __init__(self, interval: int, max_steps: int):
        self.interval = interval
        self.max_steps = max_steps
        self.before: float | None = None

    def on_train_start(self, trainer) -> None:
        if trainer.step == 0:
            self.before = trainer.method_step.heldout_accuracy()
            log0(f"held-out accuracy before GRPO: {self.before:.3f} ({len(trainer.method_step.task.held_out)} problems, greedy)")

    def on_step_end(self, trainer, record: dict) -> None:
        step = record["step"]
        if step == 1 and self.before is not None:
            record["rl/heldout_accuracy_before"] = self.before
        if step == self.max_steps or (self.interval and step % self.interval == 0):
            record["rl/heldout_accuracy"] = trainer.method_step.heldout_accuracy()
