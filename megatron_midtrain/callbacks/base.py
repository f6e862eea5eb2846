"""The callback interface: everything around the training loop that is not the step itself.

The trainer (:class:`megatron_midtrain.training.trainer.Trainer`) is a loop::

    on_train_start
    for each step:  on_step_start(step) -> train_step() -> on_step_end(record)
    on_train_end    (also after a stop; not after an error)
    close           (always, also after an error)

Callbacks run in list order (:func:`megatron_midtrain.callbacks.default_callbacks` fixes the
order: producers of metrics first, then writers, then checkpointing). ``on_step_end`` receives
the step's metrics record and may add keys to it (``val/loss``, ``lm_eval/...``) before the
writers see it. A callback asks the loop to stop after the current step by setting
``trainer.stop_reason``. ``on_save`` follows every checkpoint the trainer writes.

Every rank runs every callback (collective work, e.g. validation, needs all of them); a
callback that writes files checks ``trainer.rank0`` itself.
"""

from __future__ import annotations


class Callback:
    """Base class; override the hooks you need (all default to doing nothing)."""

    def on_train_start(self, trainer) -> None:
        """Before the first step of this launch (after building and resuming)."""

    def on_step_start(self, trainer, step: int) -> None:
        """Before step ``step`` (1-based) runs."""

    def on_step_end(self, trainer, record: dict) -> None:
        """After the optimizer step; ``record`` is this step's metrics (add keys to log more)."""

    def on_save(self, trainer) -> None:
        """After a checkpoint of ``trainer.step`` was written (or queued, with async saves)."""

    def on_train_end(self, trainer) -> None:
        """After the last step of this launch (max_steps reached or a stop was requested)."""

    def close(self, trainer) -> None:
        """Release files and handles; runs even when training failed."""
