"""The non-finite guard: a step with a NaN/inf loss is skipped; too many in a row stop the run."""

from __future__ import annotations

from megatron_midtrain.callbacks.base import Callback
from megatron_midtrain.errors import UserError
from megatron_midtrain.training import checkpoint as ckpt
from megatron_midtrain.training.runtime import log0


class NonFiniteGuard(Callback):
    """Counts consecutive skipped steps (the trainer skips the optimizer step on a non-finite
    loss and keeps the LR schedule moving); at ``max_in_row`` it stops with a UserError that
    names the last good checkpoint, which is never overwritten by a diverged state."""

    def __init__(self, max_in_row: int):
        self.max_in_row = max_in_row
        self.in_row = 0

    def on_step_end(self, trainer, record: dict) -> None:
        step = record["step"]
        if not record.get("skipped"):
            self.in_row = 0
            return
        self.in_row += 1
        log0(f"step {step}: non-finite loss ({record['loss']}), step skipped ({self.in_row}/{self.max_in_row} in a row)")
        if self.in_row >= self.max_in_row:
            raise UserError(
                f"{self.in_row} consecutive steps had a non-finite loss (last at step {step}); "
                f"the last good checkpoint is kept in {ckpt.checkpoint_root(trainer.run_dir)}",
                "lower optimizer.lr, check the data, or raise train.max_consecutive_nonfinite",
            )
