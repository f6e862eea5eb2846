"""lm-evaluation-harness tasks on the live model during training (``lm_eval.tasks=[...]``)."""

from __future__ import annotations

from megatron_midtrain.callbacks.base import Callback


class LMEvalTasks(Callback):
    """Runs ``lm_eval.tasks`` every ``lm_eval.interval`` steps and at the last step; the flat
    metrics go into the record as ``lm_eval/<task>/<metric>`` and the full results into
    ``<run dir>/eval/lm_eval_step<N>.json`` (see :mod:`megatron_midtrain.eval.hook`).

    Built only when tasks are set; building it checks the harness and the task names, so a
    bad task fails before any training.
    """

    def __init__(self, cfg):
        from megatron_midtrain.eval import hook

        hook.check_lm_eval_config(cfg)
        self.cfg = cfg

    def on_step_end(self, trainer, record: dict) -> None:
        from megatron_midtrain.eval import hook

        if hook.due(self.cfg, record["step"]):
            record.update(hook.run_in_training(trainer))
