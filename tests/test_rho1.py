"""RHO-1: excess-loss top-k selection (pure functions) and global-batch selection under TP/PP/DP."""

import math

import pytest
import torch

from megatron_midtrain.losses.rho1 import excess_loss, topk_threshold
from megatron_midtrain.testing.distributed import run_distributed
from megatron_midtrain.testing.runs import train_and_report


def test_threshold_keeps_ceil_of_ratio():
    s = torch.tensor([0.5, -1.0, 3.0, 2.0, 0.0])
    assert topk_threshold(s, 0.4) == 2.0  # ceil(0.4 * 5) = 2 -> {3.0, 2.0}
    assert topk_threshold(s, 1.0) == -1.0
    assert topk_threshold(s, 0.01) == 3.0
    assert math.isinf(topk_threshold(torch.tensor([]), 0.8))


def test_excess_loss_sign():
    # the reference is more confident than the policy -> positive excess loss
    assert excess_loss(torch.tensor([-3.0]), torch.tensor([-1.0])).item() == 2.0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rho1_ref")
    run_distributed(train_and_report, 1, [f"run.dir={run_dir}", "train.max_steps=4", "optimizer.lr=1e-2", "run.seed=7"])
    return str(run_dir)


STEPS = 4


@pytest.fixture(scope="module")
def baseline(reference, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rho1_tp1")
    over = ["method=rho1", f"reference.checkpoint={reference}", f"train.max_steps={STEPS}", f"run.dir={run_dir}"]
    return run_distributed(train_and_report, 1, over)[0]["records"]


@pytest.mark.parametrize("world,layout", [(4, ["parallel.tp=2", "parallel.pp=2"]), (2, [])], ids=["tp2pp2", "dp2"])
def test_rho1_global_selection_is_layout_invariant(world, layout, reference, baseline, tmp_path):
    over = ["method=rho1", f"reference.checkpoint={reference}", f"train.max_steps={STEPS}", f"run.dir={tmp_path}"]
    records = run_distributed(train_and_report, world, layout + over)[0]["records"]
    for ref, got in zip(baseline, records):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), ref["step"]
        assert got["rho1/kept_frac"] == pytest.approx(ref["rho1/kept_frac"], rel=1e-6)
    # top 80% of the global batch's tokens (ceil; ties could only add a few)
    assert 0.8 <= baseline[0]["rho1/kept_frac"] < 0.81
    # the kept tokens are the hard ones: their mean loss exceeds the mean over all tokens
    assert baseline[0]["loss"] > baseline[0]["ntp_loss"]
