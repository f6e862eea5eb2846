"""The embedded demo's base model and reference model, built on first use and cached.

ReMiT needs a base model to mid-train and a reference that is better at reasoning.
For the demo both come from the generated corpus:

* **base**: the demo model trained with NTP on the prose + arithmetic blend;
* **reference**: the base trained further on the arithmetic half only. This is an
  SFT-style reference, not an RL-tuned one (the RMT issue will provide a GRPO-tuned one).

Each is an ordinary run directory under the demo cache; an interrupted build resumes
like any run, and a finished one is reused. All ranks take part (same layout as the
main run); checkpoints are layout-independent, so later runs may use any TP/PP.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from megatron_midtrain.config.schema import MidtrainConfig, NTPMethodConfig
from megatron_midtrain.training import checkpoint as ckpt

#: NTP steps of the base model on the demo blend, and of the reference on arithmetic only.
BASE_STEPS = 60
REFERENCE_STEPS = 30


def uses_demo_reference(cfg: MidtrainConfig) -> bool:
    """A reference-based method on the demo data with no reference given."""
    from megatron_midtrain.losses import build_method

    needs = build_method(cfg.method).needs_reference is not None
    return needs and not cfg.data.paths and not cfg.reference.checkpoint and cfg.reference.mode == "colocated"


def _models_root(cfg: MidtrainConfig) -> str:
    from megatron_midtrain.data.demo import default_cache_dir

    key = json.dumps(
        [dataclasses.asdict(cfg.model), cfg.data.seq_length, cfg.train.global_batch_tokens, cfg.run.seed, BASE_STEPS, REFERENCE_STEPS],
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return os.path.join(cfg.run.cache_dir or default_cache_dir(), f"demo-models-{digest}")


def _stage_config(cfg: MidtrainConfig, run_dir: str, steps: int, math_weight: float, init_from: str | None) -> MidtrainConfig:
    return dataclasses.replace(
        cfg,
        method=NTPMethodConfig(),
        run=dataclasses.replace(cfg.run, dir=run_dir, plot=False, tensorboard=False),
        data=dataclasses.replace(cfg.data, demo_math_weight=math_weight),
        train=dataclasses.replace(
            cfg.train, max_steps=steps, save_interval=0, eval_interval=0, exit_at_step=None,
            init_from=init_from, inject_nonfinite_at=[], log_interval=max(1, steps // 4),
        ),
    )


def _train_stage(stage_cfg: MidtrainConfig, label: str) -> str:
    from megatron_midtrain.training.trainer import Trainer, log0

    root = ckpt.checkpoint_root(stage_cfg.run.dir)
    if ckpt.latest_checkpoint(root) == stage_cfg.train.max_steps:
        return stage_cfg.run.dir
    log0(f"[demo models] building the {label} ({stage_cfg.train.max_steps} NTP steps) in {stage_cfg.run.dir}")
    trainer = Trainer(stage_cfg)
    try:
        trainer.train()
    finally:
        trainer.close(keep_distributed=True)  # the main run reuses the same process groups
    return stage_cfg.run.dir


def ensure_demo_models(cfg: MidtrainConfig) -> tuple[str, str]:
    """(base run dir, reference run dir), training them first if the cache lacks them. Collective."""
    root = _models_root(cfg)
    base = _train_stage(_stage_config(cfg, os.path.join(root, "base"), BASE_STEPS, cfg.data.demo_math_weight, None), "base model")
    reference = _train_stage(_stage_config(cfg, os.path.join(root, "reference"), REFERENCE_STEPS, 1.0, base), "reference (base + arithmetic only)")
    return base, reference


def with_demo_reference(cfg: MidtrainConfig) -> MidtrainConfig:
    """Point a reference-based demo run at the cached base (policy init) and reference."""
    if not uses_demo_reference(cfg):
        return cfg
    base, reference = ensure_demo_models(cfg)
    return dataclasses.replace(
        cfg,
        reference=dataclasses.replace(cfg.reference, checkpoint=reference),
        train=dataclasses.replace(cfg.train, init_from=cfg.train.init_from or base),
    )
