"""remit_token_weights against the paper's equations (3)-(5) on edge cases."""

import math

import pytest
import torch

from megatron_midtrain.losses.remit import remit_token_weights


def reference_weights(policy, ref, mask, eps, groups):
    """Straightforward per-token loops of eq. 3-5; groups = list of position lists to centre over."""
    w = [[1.0] * len(row) for row in policy]
    for positions in groups:
        kept = [(b, t) for b, t in positions if mask[b][t]]
        if not kept:
            continue
        deltas = {(b, t): -policy[b][t] + ref[b][t] for b, t in kept}
        mu = sum(deltas.values()) / len(deltas)
        for (b, t), d in deltas.items():
            s = 2.0 / (1.0 + math.exp(-(d - mu)))
            w[b][t] = min(max(s, 1.0 - eps), 1.0 + eps)
    return torch.tensor(w)


def rows_as_groups(shape):
    return [[(b, t) for t in range(shape[1])] for b in range(shape[0])]


def test_matches_equations_on_random_inputs_with_padding():
    g = torch.Generator().manual_seed(0)
    policy = -torch.rand(3, 7, generator=g) * 5
    ref = -torch.rand(3, 7, generator=g) * 5
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 5:] = False  # right padding
    mask[2, :2] = False  # prompt-style masked prefix
    got = remit_token_weights(policy, ref, mask, clip_eps=0.3)
    want = reference_weights(policy.tolist(), ref.tolist(), mask.tolist(), 0.3, rows_as_groups((3, 7)))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # padding values must not move the centre: change them and nothing changes
    policy2 = policy.clone()
    policy2[0, 5:] = -100.0
    torch.testing.assert_close(remit_token_weights(policy2, ref, mask, clip_eps=0.3), got)


def test_all_masked_row_and_single_token_row():
    policy = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -9.0, -2.0]])
    ref = torch.tensor([[-0.5, -0.1, -4.0], [-3.0, -0.2, -1.0]])
    mask = torch.tensor([[False, False, False], [False, True, False]])
    w = remit_token_weights(policy, ref, mask)
    assert torch.equal(w[0], torch.ones(3))  # nothing counts: neutral weights, no NaN
    assert w[1, 1] == 1.0  # one token: centred delta is 0 -> 2*sigmoid(0) = 1


def test_eps_zero_gives_all_ones():
    policy, ref = -torch.rand(4, 9) * 3, -torch.rand(4, 9) * 3
    assert torch.equal(remit_token_weights(policy, ref, torch.ones(4, 9), clip_eps=0.0), torch.ones(4, 9))


def test_large_positive_and_negative_deltas_saturate_at_the_clip():
    policy = torch.tensor([[-50.0, -0.0, -25.0]])  # ref much better on token 0, much worse on token 1
    ref = torch.tensor([[-0.0, -50.0, -25.0]])
    w = remit_token_weights(policy, ref, torch.ones(1, 3), clip_eps=0.2)
    assert w.tolist() == [[pytest.approx(1.2), pytest.approx(0.8), pytest.approx(1.0)]]
    assert torch.isfinite(remit_token_weights(policy * 1e6, ref * 1e6, torch.ones(1, 3))).all()


def test_neutral_when_reference_equals_policy():
    policy = -torch.rand(2, 16) * 4
    w = remit_token_weights(policy, policy.clone(), torch.rand(2, 16) > 0.3)
    assert torch.equal(w, torch.ones(2, 16))


def test_weights_are_detached():
    policy = (-torch.rand(2, 5)).requires_grad_()
    w = remit_token_weights(policy, -torch.rand(2, 5), torch.ones(2, 5))
    assert not w.requires_grad


def test_document_centering_uses_each_document_mean():
    g = torch.Generator().manual_seed(1)
    policy, ref = -torch.rand(2, 8, generator=g) * 4, -torch.rand(2, 8, generator=g) * 4
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 7] = False
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 0, 0, 1, 1, 1]])
    got = remit_token_weights(policy, ref, mask, clip_eps=0.5, center="document", document_ids=docs)
    groups = [[(b, t) for t in range(8) if docs[b, t] == d] for b in range(2) for d in range(3)]
    want = reference_weights(policy.tolist(), ref.tolist(), mask.tolist(), 0.5, groups)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_no_centering():
    policy, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    w = remit_token_weights(policy, ref, torch.ones(1, 2), clip_eps=1.0, center="none")
    expected = [2 / (1 + math.exp(0.5)), 2 / (1 + math.exp(-1.0))]
    assert w[0].tolist() == [pytest.approx(v) for v in expected]


def test_bad_arguments():
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="center"):
        remit_token_weights(x, x, x, center="row")
    with pytest.raises(ValueError, match="document_ids"):
        remit_token_weights(x, x, x, center="document")
    with pytest.raises(ValueError, match="shape"):
        remit_token_weights(x, torch.zeros(1, 4), x)
