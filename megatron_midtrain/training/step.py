"""The interface between the loop and a method: a method's :class:`Step` and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class StepResult:
    """What a method's forward/backward produced (gradients are in the buffers, reduced)."""

    loss: float
    """The step's objective (non-finite: the optimizer step is skipped)."""
    metrics: dict = field(default_factory=dict)
    """Method statistics to log (``remit/...``, ``rl/...``)."""
    tokens: float = 0.0
    """Tokens processed, for ``tokens_per_s``."""
    updates: list | None = None
    """``[(skipped, grad_norm), ...]`` when the step took its optimizer updates itself (mini-batch
    GRPO: several per rollout batch, through ``trainer.optimizer_step``); None: the trainer takes
    one update of the gradients the step left in the buffers."""


class Step(Protocol):
    """A method's step: ``method.make_step(trainer)`` (default: :class:`~megatron_midtrain.training.corpus_step.CorpusStep`)."""

    def forward_backward(self, step: int) -> StepResult:
        """Run the model(s) for step ``step`` (1-based) and leave reduced gradients in the buffers."""

    def finish_record(self, record: dict) -> None:
        """Add the figures that need the whole step's timing (called after the optimizer step)."""
