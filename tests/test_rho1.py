"""RHO-1: excess-loss top-k selection (pure functions) and global-batch selection under TP/PP/DP."""

import math

import pytest
import torch

from megatron_midtrain.losses.rho1 import excess_loss, masked_topk_threshold, topk_threshold


def test_threshold_keeps_ceil_of_ratio():
    s = torch.tensor([0.5, -1.0, 3.0, 2.0, 0.0])
    assert topk_threshold(s, 0.4) == 2.0  # ceil(0.4 * 5) = 2 -> {3.0, 2.0}
    assert topk_threshold(s, 1.0) == -1.0
    assert topk_threshold(s, 0.01) == 3.0
    assert math.isinf(topk_threshold(torch.tensor([]), 0.8))


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.8, 1.0])
def test_masked_threshold_equals_threshold_of_masked_scores(ratio):
    """The sync-free per-micro-batch threshold is the top-k threshold of the masked scores."""
    g = torch.Generator().manual_seed(3)
    for density in (0.0, 0.1, 0.6, 1.0):
        scores = torch.randn(3, 17, generator=g)
        mask = torch.rand(3, 17, generator=g) < density
        expected = topk_threshold(scores[mask], ratio)
        assert torch.equal(masked_topk_threshold(scores, mask, ratio), expected), (ratio, density)


def test_excess_loss_sign():
    # the reference is more confident than the policy -> positive excess loss
    assert excess_loss(torch.tensor([-3.0]), torch.tensor([-1.0])).item() == 2.0


@pytest.mark.parametrize("layout", ["tp2pp2", "dp2"])
def test_rho1_global_selection_is_layout_invariant(layout, layout_runs):
    baseline, records = layout_runs("tp1")[("llama", "rho1")]["records"], layout_runs(layout)[("llama", "rho1")]["records"]
    assert [r["step"] for r in records] == [r["step"] for r in baseline] == list(range(1, 4))
    for ref, got in zip(baseline, records):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), ref["step"]
        assert got["rho1/kept_frac"] == pytest.approx(ref["rho1/kept_frac"], rel=1e-6)
    # top 80% of the global batch's tokens (ceil; ties could only add a few)
    assert 0.8 <= baseline[0]["rho1/kept_frac"] < 0.81
    # the kept tokens are the hard ones: their mean loss exceeds the mean over all tokens
    assert baseline[0]["loss"] > baseline[0]["ntp_loss"]
