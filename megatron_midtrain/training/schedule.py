"""Learning-rate schedules: megatron-core's OptimizerParamScheduler, configured from ScheduleConfig.

cosine   warmup, then cosine decay from optimizer.lr to optimizer.min_lr at train.max_steps
wsd      warmup, constant ("stable") stage, then a decay stage over the last
         wsd_decay_fraction of the steps (OctoThinker's two-stage mid-training)
linear   warmup, then linear decay to min_lr
constant warmup, then optimizer.lr
"""

from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

_STYLES = {"cosine": "cosine", "wsd": "WSD", "constant": "constant", "linear": "linear"}


def build_lr_scheduler(optimizer, cfg) -> OptimizerParamScheduler:
    sched, opt = cfg.schedule, cfg.optimizer
    total = cfg.train.max_steps
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
