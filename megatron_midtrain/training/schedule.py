"""Learning-rate schedules: megatron-core's OptimizerParamScheduler, configured from ScheduleConfig.

The schedule counts optimizer updates: ``train.max_steps`` of them, except for mini-batch GRPO,
which takes ``method.ppo_epochs * method.ppo_mini_batches`` updates per step.

cosine   warmup, then cosine decay from optimizer.lr to optimizer.min_lr at the last update
wsd      warmup, constant ("stable") stage, then a decay stage over the last
         wsd_decay_fraction of the steps (OctoThinker's two-stage mid-training)
linear   warmup, then linear decay to min_lr
constant warmup, then optimizer.lr
"""

from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

_STYLES = {"cosine": "cosine", "wsd": "WSD", "constant": "constant", "linear": "linear"}


def optimizer_steps(cfg) -> int:
    """Optimizer updates of the whole run: ``train.max_steps`` times the updates per step
    (mini-batch GRPO takes ``ppo_epochs * ppo_mini_batches`` per rollout batch, the rest one)."""
    return cfg.train.max_steps * getattr(cfg.method, "updates_per_step", 1)


def build_lr_scheduler(optimizer, cfg) -> OptimizerParamScheduler:
    """The schedule over optimizer updates (``schedule.warmup_steps`` counts updates too)."""
    sched, opt = cfg.schedule, cfg.optimizer
    total = optimizer_steps(cfg)
    warmup = min(sched.warmup_steps, total - 1) if total > 1 else 0
    wsd = sched.name == "wsd"
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else opt.lr,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=total,
        lr_decay_style=_STYLES[sched.name],
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
        # The config, not the checkpoint, defines the schedule: resuming with a larger
        # train.max_steps stretches the decay accordingly.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=max(1, round(sched.wsd_decay_fraction * total)) if wsd else None,
        lr_wsd_decay_style=sched.wsd_decay_style if wsd else None,
    )
