"""The embedded demo's models and RL side data, built on first use and cached.

ReMiT needs a base model to mid-train and a reference that is better at reasoning; RMT needs
a base model and its entropy index. For the demo all of them come from the generated corpus:

* **base**: the demo model trained with NTP on the prose + arithmetic blend;
* **sft-<N>**: the base trained further for ``data.demo_sft_steps`` = N steps on the arithmetic
  half only (supervised, step-by-step solutions);
* **reference-sft<N>**: that sft model post-trained with verifiable-task GRPO on the arithmetic
  problems (exact-match reward on the final answer), i.e. a genuinely RL-tuned reference;
* **entropy/<dataset>**: the base model's per-token entropy index of each demo dataset
  (``method=rmt``).

Each model is an ordinary run directory under the demo cache; an interrupted build resumes
like any run, and a finished one is reused. All ranks take part (same layout as the main
run); checkpoints are layout-independent, so later runs may use any TP/PP.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from types import SimpleNamespace

from megatron_midtrain.config.schema import GRPOMethodConfig, MidtrainConfig, NTPMethodConfig, OptimizerConfig, ScheduleConfig
from megatron_midtrain.training import checkpoint as ckpt

#: NTP steps of the base model on the demo blend.
BASE_STEPS = 60
#: The sft stage (``data.demo_sft_steps`` steps): NTP on the arithmetic half only, at a constant
#: LR with half-size batches. Many small steps, not few large ones: the model writes the same
#: solution for every problem until it learns to copy the question's numbers, somewhere between
#: 300 and 600 steps (measured: ~4% held-out accuracy at 200-300 steps, 25% at 600, 32% at 700).
#: A cosine decay over 400 steps reached 16% but left a model that GRPO at lr 5e-4 broke (its
#: accuracy fell to 1%), so the LR stays constant.
SFT_BATCH_FRACTION = 2  # sft global batch = the run's global batch / 2 (when the layout allows it)
SFT_LR = 3e-3
#: GRPO steps that turn the sft model into the RL-tuned demo reference (kept short: the whole
#: default demo, first-time builds included, stays within 5 minutes on 2 CPU cores; the
#: longer ``experiment=grpo_demo`` run measures the held-out accuracy gain).
GRPO_STEPS = 8
#: The demo GRPO recipe (also conf/experiment/grpo_demo.yaml): 16 problems x 8 rollouts a step.
GRPO_DEMO = dict(prompts_per_step=16, group_size=8, max_new_tokens=64, eval_problems=200, rollout_micro_batch_size=16,
                 generation_batch_rows=128)
#: GRPO LR (from a fresh Adam state): at 5e-4 the held-out accuracy of the 700-step sft model
#: barely moved in 40 steps and at 1e-3 it collapsed; at 2e-4 it rose at every evaluation.
GRPO_LR = 2e-4


def _is_rl(cfg: MidtrainConfig) -> bool:
    from megatron_midtrain.losses import build_method

    return bool(getattr(build_method(cfg.method), "is_rl", False))


def uses_demo_reference(cfg: MidtrainConfig) -> bool:
    """A reference-based method on the demo data with no reference given."""
    from megatron_midtrain.losses import build_method

    needs = build_method(cfg.method).needs_reference is not None
    return needs and not cfg.data.paths and not cfg.reference.checkpoint and cfg.reference.mode == "colocated"


def _models_root(cfg: MidtrainConfig) -> str:
    from megatron_midtrain.data.demo import default_cache_dir

    key = json.dumps(
        [dataclasses.asdict(cfg.model), cfg.data.seq_length, cfg.train.global_batch_tokens, cfg.run.seed,
         BASE_STEPS, SFT_BATCH_FRACTION, SFT_LR, GRPO_STEPS, GRPO_DEMO, GRPO_LR],
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return os.path.join(cfg.run.cache_dir or default_cache_dir(), f"demo-models-{digest}")


def _stage_config(cfg: MidtrainConfig, run_dir: str, steps: int, math_weight: float, init_from: str | None,
                  method=None, lr: float | None = None, batch_tokens: int | None = None) -> MidtrainConfig:
    batch_tokens = batch_tokens or cfg.train.global_batch_tokens
    return dataclasses.replace(
        cfg,
        method=method or NTPMethodConfig(),
        run=dataclasses.replace(cfg.run, dir=run_dir, plot=False, tensorboard=False),
        data=dataclasses.replace(cfg.data, demo_math_weight=math_weight),
        train=dataclasses.replace(
            cfg.train, max_steps=steps, save_interval=0, eval_interval=0, exit_at_step=None,
            init_from=init_from, log_interval=max(1, steps // 4),
            global_batch_tokens=batch_tokens,
            micro_batch_size=_stage_micro_batch(cfg, batch_tokens),
        ),
        # The demo models follow their own recipe, whatever the user's run sets.
        optimizer=dataclasses.replace(OptimizerConfig(), lr=lr) if lr else OptimizerConfig(),
        schedule=ScheduleConfig(name="constant", warmup_steps=min(5, steps // 10)) if lr else ScheduleConfig(),
        lm_eval=dataclasses.replace(cfg.lm_eval, tasks=[]),
    )


def _stage_micro_batch(cfg: MidtrainConfig, batch_tokens: int, largest: int = 16) -> int:
    """The largest micro-batch (<= ``largest`` rows) that splits the stage's batch evenly.

    The losses are the same for any micro-batch size; fewer, larger micro-batches are ~20%
    faster on the CPU (the default demo has a 5-minute budget, first-time builds included).
    """
    rows = batch_tokens // (cfg.data.seq_length * _data_parallel_size(cfg))
    if rows < 1:  # a batch too small for the layout: the stage's trainer refuses it with the fix
        return cfg.train.micro_batch_size
    return max(m for m in range(1, min(largest, rows) + 1) if rows % m == 0)


def _data_parallel_size(cfg: MidtrainConfig) -> int:
    """DP of the run's layout; works before the process group exists (the stages are built first)."""
    from megatron_midtrain.training.distributed import check_layout, world_size_from_env

    return check_layout(cfg, world_size_from_env())


def _train_stage(stage_cfg: MidtrainConfig, label: str) -> str:
    from megatron_midtrain.training.runtime import log0
    from megatron_midtrain.training.trainer import Trainer

    root = ckpt.checkpoint_root(stage_cfg.run.dir)
    if ckpt.latest_checkpoint(root) == stage_cfg.train.max_steps:
        return stage_cfg.run.dir
    log0(f"[demo models] building the {label} ({stage_cfg.train.max_steps} steps) in {stage_cfg.run.dir}")
    trainer = Trainer(stage_cfg)
    try:
        trainer.train()
    finally:
        trainer.close(keep_distributed=True)  # the main run reuses the same process groups
    return stage_cfg.run.dir


def ensure_base(cfg: MidtrainConfig) -> str:
    """The demo base model's run dir (trained first if missing). Collective."""
    root = _models_root(cfg)
    return _train_stage(_stage_config(cfg, os.path.join(root, "base"), BASE_STEPS, cfg.data.demo_math_weight, None), "base model (NTP)")


def _sft_batch_tokens(cfg: MidtrainConfig) -> int:
    """Half the run's global batch when that is still whole sequences on every DP rank."""
    smaller = cfg.train.global_batch_tokens // SFT_BATCH_FRACTION
    unit = cfg.data.seq_length * _data_parallel_size(cfg)
    return smaller if smaller >= unit and smaller % unit == 0 else cfg.train.global_batch_tokens


def ensure_base_and_sft(cfg: MidtrainConfig) -> tuple[str, str]:
    root = _models_root(cfg)
    base = ensure_base(cfg)
    steps = cfg.data.demo_sft_steps
    sft_cfg = _stage_config(cfg, os.path.join(root, f"sft-{steps}"), steps, 1.0, base, lr=SFT_LR, batch_tokens=_sft_batch_tokens(cfg))
    sft = _train_stage(sft_cfg, "sft model (base + arithmetic only)")
    return base, sft


def ensure_demo_models(cfg: MidtrainConfig) -> tuple[str, str]:
    """(base run dir, RL-tuned reference run dir), training them first if the cache lacks them. Collective."""
    base, sft = ensure_base_and_sft(cfg)
    grpo = GRPOMethodConfig(**GRPO_DEMO)
    ref_dir = os.path.join(_models_root(cfg), f"reference-sft{cfg.data.demo_sft_steps}")
    ref_cfg = _stage_config(cfg, ref_dir, GRPO_STEPS, 1.0, sft, method=grpo, lr=GRPO_LR)
    reference = _train_stage(ref_cfg, "RL-tuned reference (sft + verifiable-task GRPO on arithmetic)")
    return base, reference


def ensure_demo_entropy(cfg: MidtrainConfig, base: str, out_root: str | None = None) -> list[str]:
    """The base model's entropy index of each demo dataset (one dir per prefix), under ``out_root``
    (default: the demo models' cache, which assumes ``base`` is the demo base). Collective."""
    import torch.distributed as dist

    from megatron_midtrain.rl.entropy import read_entropy_meta
    from megatron_midtrain.rl.entropy_index import run as build_entropy
    from megatron_midtrain.training.data import resolve_sources
    from megatron_midtrain.training.distributed import broadcast_object

    prefixes = broadcast_object(resolve_sources(cfg)[1] if (not dist.is_initialized() or dist.get_rank() == 0) else None)
    dirs = []
    for prefix in prefixes:
        out = os.path.join(out_root or os.path.join(_models_root(cfg), "entropy"), os.path.basename(prefix))
        done = broadcast_object(os.path.isfile(os.path.join(out, "meta.json")) and read_entropy_meta(out).get("complete", False)
                                if (not dist.is_initialized() or dist.get_rank() == 0) else None)
        if not done:
            args = SimpleNamespace(
                checkpoint=base, data=prefix, output=out, tp=cfg.parallel.tp, pp=cfg.parallel.pp, window=cfg.data.seq_length,
                stride=0, micro_batch_tokens=8192, block_tokens=1 << 16, thresholds=None, quantiles=(1 / 3, 2 / 3),
                precision="auto", max_blocks=0, log_interval=0, keep_distributed=True,
            )
            build_entropy(args)
        dirs.append(out)
    return dirs


def with_demo_models(cfg: MidtrainConfig) -> MidtrainConfig:
    """Fill in what a demo run needs and was not given: the policy init, the reference, the entropy index."""
    if cfg.data.paths:
        return cfg
    if _is_rl(cfg):
        if cfg.method.name == "rmt":
            if cfg.method.entropy_dirs and cfg.train.init_from:
                return cfg
            base = ensure_base(cfg)
            dirs = list(cfg.method.entropy_dirs) or ensure_demo_entropy(cfg, base)
            return dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, entropy_dirs=dirs),
                                       train=dataclasses.replace(cfg.train, init_from=cfg.train.init_from or base))
        if cfg.train.init_from:
            return cfg
        _, sft = ensure_base_and_sft(cfg)
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=sft))
    if not uses_demo_reference(cfg):
        return cfg
    base, reference = ensure_demo_models(cfg)
    return dataclasses.replace(
        cfg,
        reference=dataclasses.replace(cfg.reference, checkpoint=reference),
        train=dataclasses.replace(cfg.train, init_from=cfg.train.init_from or base),
    )


#: Kept for callers of the ReMiT-only name.
with_demo_reference = with_demo_models
