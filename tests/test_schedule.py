"""LR schedules: warmup, cosine-to-minimum, WSD (stable then decay)."""

import math

import pytest
import torch

from megatron_midtrain.config.loader import load_config
from megatron_midtrain.training.schedule import build_lr_scheduler


def lrs(overrides, steps):
    cfg = load_config(overrides + [f"train.max_steps={steps}"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optimizer.lr)
    sched = build_lr_scheduler(opt, cfg)
    out = []
    for _ in range(steps):
        sched.step(1)
        out.append(opt.param_groups[0]["lr"])
    return cfg, out


def test_cosine_warmup_then_decay_to_min():
    cfg, lr = lrs(["schedule.name=cosine", "schedule.warmup_steps=10", "optimizer.lr=1e-3", "optimizer.min_lr=1e-7"], 100)
    assert lr[0] == pytest.approx(1e-4)  # linear warmup: step 1 of 10
    assert lr[9] == pytest.approx(1e-3)  # peak at the end of warmup
    assert all(a >= b for a, b in zip(lr[9:], lr[10:]))  # monotone decay afterwards
    assert lr[-1] == pytest.approx(1e-7)  # ReMiT: cosine to the minimum
    mid = 10 + 45  # half-way through the decay
    expected = 1e-7 + 0.5 * (1e-3 - 1e-7) * (1 + math.cos(math.pi * (mid - 10) / 90))
    assert lr[mid - 1] == pytest.approx(expected, rel=1e-6)


def test_wsd_stable_then_decay():
    _, lr = lrs(["schedule.name=wsd", "schedule.warmup_steps=5", "schedule.wsd_decay_fraction=0.2",
                 "optimizer.lr=2e-4", "optimizer.min_lr=2e-5"], 100)
    assert lr[4] == pytest.approx(2e-4)
    assert all(v == pytest.approx(2e-4) for v in lr[4:80])  # stable stage
    assert lr[85] < 2e-4 and lr[-1] == pytest.approx(2e-5)  # decay over the last 20%


def test_constant_without_warmup():
    _, lr = lrs(["schedule.name=constant", "schedule.warmup_steps=0", "optimizer.lr=3e-4"], 20)
    assert lr == [pytest.approx(3e-4)] * 20
