"""Callbacks: the extras around the training loop, each configured from its own config section.

:func:`default_callbacks` builds the configured list in the order they must run: metric
producers (validation, lm-eval, the method's own), then the writers (W&B, metrics.jsonl,
progress), the non-finite guard, stop signals and checkpointing, the plot; the profiler, when
on, comes first so that its window spans the others.
"""

from __future__ import annotations

from megatron_midtrain.callbacks.base import Callback
from megatron_midtrain.callbacks.checkpointing import Checkpointing, SignalStop
from megatron_midtrain.callbacks.metrics_log import MetricsFile, MetricsPlot, ProgressLog
from megatron_midtrain.callbacks.nonfinite import NonFiniteGuard
from megatron_midtrain.callbacks.profiler import TorchProfiler
from megatron_midtrain.callbacks.validation import ValidationLoss
from megatron_midtrain.callbacks.wandb import WandbLogger

__all__ = ["Callback", "default_callbacks"]


def default_callbacks(cfg, method_callbacks: list[Callback] = ()) -> list[Callback]:
    """The callbacks ``cfg`` asks for; ``method_callbacks`` (e.g. GRPO's held-out accuracy) run after validation."""
    t = cfg.train
    # The profiler first: its window then covers every other callback of the profiled steps.
    callbacks: list[Callback] = [c for c in (TorchProfiler.from_config(cfg),) if c is not None]
    callbacks.append(ValidationLoss(t.eval_interval, t.max_steps))
    if cfg.lm_eval.tasks:
        from megatron_midtrain.callbacks.lm_eval import LMEvalTasks

        callbacks.append(LMEvalTasks(cfg))
    callbacks += list(method_callbacks)
    wandb = WandbLogger.from_config(cfg)  # checks that wandb is installed, before any work
    if wandb is not None:
        callbacks.append(wandb)
    callbacks += [
        MetricsFile(cfg.run.tensorboard),
        ProgressLog(t.log_interval, t.max_steps),
        NonFiniteGuard(t.max_consecutive_nonfinite),
        SignalStop(),
        Checkpointing(t.save_interval, t.max_steps, t.exit_at_step),
    ]
    if cfg.run.plot:
        callbacks.append(MetricsPlot())
    return callbacks
