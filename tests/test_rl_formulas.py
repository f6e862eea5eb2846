"""Unit tests for the RMT pure formulas: budget, rewards, curriculum, GRPO, prompts (issue 5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_midtrain.rl.budget import token_budget
from megatron_midtrain.rl.curriculum import (
    DEFAULT_DISTRIBUTIONS,
    curriculum_probs,
    sample_positions,
)
from megatron_midtrain.rl.grpo import (
    dual_objective,
    grpo_advantages,
    grpo_policy_loss,
    k3_kl,
)
from megatron_midtrain.rl.prompts import build_prompt
from megatron_midtrain.rl.rewards import (
    score_exact_match,
    combine_rewards,
    extract_answer,
    length_reward,
    prefix_match,
    score_prefix_match,
)


# ---------------------------------------------------------------------------------- budget
def test_token_budget_schedule():
    T = 1000
    assert token_budget(0, T) == 800
    assert token_budget(T, T) == 160  # 800 * 0.2, despite float round-off
    assert token_budget(T // 2, T) == math.floor(800 * 0.2**0.5)  # 357
    for s in range(0, T + 1, 37):
        assert token_budget(s, T) == max(1, math.floor(800 * 0.2 ** (s / T) + 1e-9))
    seq = [token_budget(s, T) for s in range(T + 1)]
    assert (np.diff(seq) <= 0).all()  # non-increasing
    assert token_budget(2 * T, T) == 160  # clamped past the end
    assert token_budget(T, T, b0=10, gamma=0.01, b_min=3) == 3  # b_min floor
    assert token_budget(T, T, b0=1, gamma=0.2, b_min=1) == 1
    with pytest.raises(ValueError):
        token_budget(0, 0)


# ---------------------------------------------------------------------------------- length reward
@pytest.mark.parametrize("B", [1, 7, 100])
def test_length_reward_triangle(B):
    assert length_reward(B, B) == 1.0
    assert length_reward(0, B) == 0.0
    assert length_reward(2 * B, B) == 0.0
    assert length_reward(2 * B + 1, B) == 0.0
    assert length_reward(10 * B, B) == 0.0
    assert length_reward(B - 1, B) == pytest.approx((B - 1) / B)
    assert length_reward(B + 1, B) == pytest.approx((B - 1) / B)
    assert length_reward(2 * B - 1, B) == pytest.approx(1 / B)
    # tensor form agrees with scalar form
    lengths = torch.arange(0, 3 * B + 2)
    t = length_reward(lengths, B)
    ref = torch.tensor([length_reward(int(x), B) for x in lengths], dtype=torch.float32)
    torch.testing.assert_close(t, ref)


def test_length_reward_bad_budget():
    with pytest.raises(ValueError):
        length_reward(3, 0)


# ---------------------------------------------------------------------------------- prefix match
def test_prefix_match_token_boundary():
    gt = [b" the", b" cat", b" sat"]
    assert prefix_match("the", gt)
    assert prefix_match("the cat", gt)  # spans two tokens
    assert prefix_match("the cat sat", gt)
    assert not prefix_match("th", gt)  # prefix but not on a boundary
    assert not prefix_match("the ca", gt)
    assert not prefix_match("the dog", gt)
    assert not prefix_match("the cat sat on", gt)  # longer than the ground truth


def test_prefix_match_leading_whitespace():
    gt = [b" the", b" cat"]
    assert prefix_match(" the", gt)
    assert prefix_match("the", gt)
    assert prefix_match("\n the", gt)
    # raw-bytes mode: the leading space matters
    assert prefix_match(" the", gt, strip_leading_whitespace=False)
    assert not prefix_match("the", gt, strip_leading_whitespace=False)
    # ground truth made of a whitespace-only token first: its boundary is dropped, later ones shift
    gt2 = [b"\n", b"Hello", b" world"]
    assert prefix_match("Hello", gt2)
    assert prefix_match("Hello world", gt2)
    assert not prefix_match("Hell", gt2)


def test_prefix_match_multibyte_utf8():
    # whole characters per token
    gt = ["日", "本", "語"]
    assert prefix_match("日", gt)
    assert prefix_match("日本", gt)
    assert not prefix_match("本", gt)
    # byte-level BPE splitting one character across tokens: "日" is e6 97 a5
    split = [b"\xe6\x97", b"\xa5\xe6\x9c\xac"]  # boundaries at bytes 2 and 6
    assert not prefix_match("日", split)  # 3 bytes: inside the second token
    assert prefix_match("日本", split)
    # accented char split over tokens
    gt3 = [b"caf", b"\xc3", b"\xa9", b" au"]
    assert prefix_match("caf", gt3)
    assert prefix_match("café", gt3)
    assert prefix_match("café au", gt3)
    assert not prefix_match("cafe", gt3)  # 'e' is not 'é'


def test_prefix_match_reward_edge_cases():
    gt = [b" Paris", b" is"]
    assert score_prefix_match("I think... <answer> Paris</answer>", gt).reward == 1.0
    assert score_prefix_match("<answer>Paris </answer>", gt).reward == 1.0  # trailing ws stripped
    assert score_prefix_match("<answer>Par</answer>", gt).reward == 0.0
    assert score_prefix_match("<answer>London</answer>", gt).reward == 0.0
    # the last answer counts
    assert score_prefix_match("<answer>London</answer> wait <answer>Paris</answer>", gt).reward == 1.0
    # empty answer and missing tag take the configurable penalties
    assert score_prefix_match("<answer>   </answer>", gt, empty_penalty=-0.5).reward == -0.5
    assert score_prefix_match("<answer></answer>", gt, empty_penalty=-0.25).reward == -0.25
    assert score_prefix_match("Paris", gt, missing_penalty=-2.0).reward == -2.0
    assert score_prefix_match("<answer>Paris", gt, missing_penalty=-1.0).reward == -1.0  # unclosed tag
    assert score_prefix_match("Paris", gt).status == "missing"
    assert score_prefix_match("<answer> </answer>", gt).status == "empty"
    assert score_prefix_match("<answer>Paris</answer>", gt).correct
    # boxed format
    assert score_prefix_match("so \\boxed{Paris}", gt, answer_format="boxed").reward == 1.0
    assert score_prefix_match("so \\boxed{Paris", gt, answer_format="boxed", missing_penalty=-3.0).reward == -3.0
    assert score_prefix_match("\\boxed{}", gt, answer_format="boxed", empty_penalty=-0.7).reward == -0.7


def test_plain_format_compares_whitespace_as_it_is():
    # answer_format=plain: the response is the continuation itself. The ground truth " 23 foxes"
    # as the demo's SentencePiece splits it: a lone space, then the digits.
    gt = [b" ", b"2", b"3", b" foxes"]
    assert score_prefix_match(" ", gt, answer_format="plain").correct  # before: "empty", -1
    assert score_prefix_match(" 23", gt, answer_format="plain").correct
    assert score_prefix_match(" 23 foxes", gt, answer_format="plain").correct
    wrong = score_prefix_match("2", gt, answer_format="plain")  # skips the space: before, "correct"
    assert wrong.status == "wrong" and wrong.reward == 0.0
    assert score_prefix_match(" 2", gt, answer_format="plain").correct
    assert score_prefix_match(" 24", gt, answer_format="plain").reward == 0.0
    assert score_prefix_match("\n", [b"\n", b"Next"], answer_format="plain").correct
    assert score_prefix_match("", gt, answer_format="plain", empty_penalty=-0.5).reward == -0.5  # e.g. an immediate EOS
    # trailing whitespace is part of the prediction: " foxes " is not a prefix of " foxes"
    assert score_prefix_match(" foxes ", [b" foxes"], answer_format="plain").reward == 0.0
    # the tagged formats keep the whitespace-insensitive rule (a model writes <answer>23</answer>)
    assert score_prefix_match("<answer>23</answer>", gt).correct


class _SentencePieceLike:
    """Decodes as SentencePiece does: a token's leading "▁" becomes a space, except at the start."""

    pieces = {1: "▁counted", 2: "▁", 3: "2", 4: "3", 5: "▁foxes"}

    def detokenize(self, ids):
        return "".join(self.pieces[i] for i in ids).replace("▁", " ").removeprefix(" ")


def test_response_text_reads_as_after_the_prompt():
    from megatron_midtrain.rl.tasks import NextTokenTask, Prompt, continuation_bytes, response_text

    tok = _SentencePieceLike()
    context, target = [1], [2, 3, 4, 5]
    gt = continuation_bytes(tok, context, target)
    assert gt == [b" ", b"2", b"3", b" foxes"]
    assert response_text(tok, [5], None, ()) == "foxes"  # decoded alone, the space is gone
    assert response_text(tok, [5], None, (), after=context) == " foxes"
    assert response_text(tok, [2, 3, 4], None, (), after=context) == " 23"
    assert response_text(tok, [2, 3, 0], 0, (), after=context) == " 2"  # a final EOS is dropped
    assert response_text(tok, [0], 0, (), after=context) == ""

    class Cfg:
        answer_format, missing_penalty, empty_penalty, answer_regex = "plain", -1.0, -1.0, None
        reward_combine, reward_w_acc, reward_w_len = "sum", 1.0, 1.0

    task = NextTokenTask.__new__(NextTokenTask)
    task.cfg = Cfg()
    prompt = Prompt(ids=context, budget=1, target_bytes=gt)
    for response, acc in (([2], 1.0), ([3], 0.0), ([5], 0.0), ([0], -1.0)):
        reward, result, _ = task.score(response_text(tok, response, 0, (), after=prompt.ids[-1:]), len(response), prompt)
        assert result.reward == acc, (response, result)
        assert reward == acc + 1.0  # the length reward of one token at budget 1


def test_extract_answer():
    assert extract_answer("a <answer>x</answer> b <answer>y</answer>") == "y"
    assert extract_answer("no tag") is None
    assert extract_answer("\\boxed{\\frac{1}{2}} then \\boxed{a{b}c}", "boxed") == "a{b}c"
    assert extract_answer("Step 1: 3 * 12 = 36. The answer is 29.", "answer_is") == "29"
    with pytest.raises(ValueError):
        extract_answer("x", "json")


def test_exact_match_reward():
    resp = "Step 1: 3 * 12 = 36. Step 2: 36 - 7 = 29. The answer is 29."
    assert score_exact_match(resp, 29).reward == 1.0
    assert score_exact_match(resp, "29").reward == 1.0
    assert score_exact_match(resp, 30).reward == 0.0
    assert score_exact_match("The answer is 1,000.", 1000).reward == 1.0
    assert score_exact_match("The answer is 4.0", 4).reward == 1.0
    assert score_exact_match("I don't know", 4, missing_penalty=-1.0).reward == -1.0
    assert score_exact_match("<answer>-3</answer>", -3, answer_format="answer_tag").reward == 1.0


def test_combine_rewards():
    assert combine_rewards(1.0, 0.5) == 1.5
    assert combine_rewards(1.0, 0.5, mode="weighted", w_acc=2.0, w_len=0.5) == 2.25
    assert combine_rewards(1.0, 0.5, mode="product") == 0.5
    assert combine_rewards(-1.0, 0.5, mode="product") == -1.0
    t = combine_rewards(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(t, torch.tensor([1.5, 0.25]))
    with pytest.raises(ValueError):
        combine_rewards(1.0, 1.0, mode="max")


# ---------------------------------------------------------------------------------- curriculum
def test_curriculum_probs_knots():
    T = 1000
    d0, d1, d2 = (np.asarray(d) / np.sum(d) for d in DEFAULT_DISTRIBUTIONS)
    np.testing.assert_allclose(curriculum_probs(0, T), d0)
    np.testing.assert_allclose(curriculum_probs(300, T), d1)
    np.testing.assert_allclose(curriculum_probs(700, T), d2)
    np.testing.assert_allclose(curriculum_probs(T, T), d2)
    np.testing.assert_allclose(curriculum_probs(150, T), 0.5 * (d0 + d1))
    np.testing.assert_allclose(curriculum_probs(500, T), 0.5 * (d1 + d2))
    np.testing.assert_allclose(curriculum_probs(850, T), d2)
    for s in range(0, T + 1, 50):
        p = curriculum_probs(s, T)
        assert p.min() >= 0 and abs(p.sum() - 1) < 1e-12
    dists = ((1, 0, 0), (0, 1, 0), (0, 0, 2))
    np.testing.assert_allclose(curriculum_probs(20, 100, dists, t1=0.2, t2=0.6), [0, 1, 0])
    np.testing.assert_allclose(curriculum_probs(40, 100, dists, t1=0.2, t2=0.6), [0, 0.5, 0.5])
    with pytest.raises(ValueError):
        curriculum_probs(0, 10, t1=0.7, t2=0.3)


def test_sample_positions_deterministic_and_masked():
    rng = np.random.default_rng(0)
    buckets = rng.integers(0, 3, size=(4, 64))
    mask = rng.random((4, 64)) > 0.2
    a = sample_positions(buckets, mask, [0.2, 0.3, 0.5], 40, seed=1, step=5)
    b = sample_positions(torch.as_tensor(buckets), torch.as_tensor(mask), [0.2, 0.3, 0.5], 40, seed=1, step=5)
    np.testing.assert_array_equal(a.positions, b.positions)
    c = sample_positions(buckets, mask, [0.2, 0.3, 0.5], 40, seed=1, step=6)
    assert not np.array_equal(a.positions, c.positions)
    assert len(a.positions) == 40 and len(set(a.positions.tolist())) == 40
    assert mask.reshape(-1)[a.positions].all()
    np.testing.assert_array_equal(buckets.reshape(-1)[a.positions], a.buckets)
    assert a.counts.sum() == 40
    np.testing.assert_array_equal(a.counts, np.bincount(a.buckets, minlength=3))
    rows, cols = a.unravel(buckets.shape)
    assert mask[rows, cols].all()


def test_sample_positions_bucket_exhaustion_and_proportions():
    buckets = np.array([0] * 3 + [1] * 100 + [2] * 100)
    mask = np.ones_like(buckets, dtype=bool)
    s = sample_positions(buckets, mask, [1.0, 0.0, 0.0], 10, seed=0)
    assert s.counts[0] == 3 and s.counts.sum() == 10  # easy exhausted, rest falls back
    big = np.repeat([0, 1, 2], 10000)
    s = sample_positions(big, np.ones_like(big), [0.1, 0.3, 0.6], 3000, seed=3)
    np.testing.assert_allclose(s.counts / 3000, [0.1, 0.3, 0.6], atol=0.04)
    s = sample_positions(big[:5], np.ones(5), [0.1, 0.3, 0.6], 100, seed=3)
    assert s.counts.sum() == 5  # never more than the masked positions


# ---------------------------------------------------------------------------------- GRPO
def test_advantages_with_and_without_std():
    r = torch.tensor([0.3, 0.5, 0.7, 0.9, 0.4, 0.6, 0.8, 0.2, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    G = 4
    a = grpo_advantages(r, G)
    a_ns = grpo_advantages(r, G, no_std=True)
    for g in range(3):
        grp = r[g * G:(g + 1) * G].tolist()
        mean = sum(grp) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (G - 1))
        for i, x in enumerate(grp):
            assert a[g * G + i].item() == pytest.approx((x - mean) / (std + 1e-6), rel=1e-5, abs=1e-6)
            assert a_ns[g * G + i].item() == pytest.approx(x - mean, abs=1e-6)
    assert torch.all(a[8:] == 0) and torch.all(a_ns[8:] == 0)  # identical rewards -> zero advantage
    a2 = grpo_advantages(r.reshape(3, G), G)
    torch.testing.assert_close(a2.reshape(-1), a)
    with pytest.raises(ValueError):
        grpo_advantages(r, 5)


def _reference_loss(lp, old, adv, mask, ref, eps_lo, eps_hi, beta, agg, C):
    """Straightforward per-sample, per-token Python loop."""
    N, L = len(lp), len(lp[0])
    tok = [[0.0] * L for _ in range(N)]
    for i in range(N):
        for t in range(L):
            rho = math.exp(lp[i][t] - old[i][t])
            a = adv[i]
            clipped = min(max(rho, 1 - eps_lo), 1 + eps_hi)
            loss = -min(rho * a, clipped * a)
            if beta:
                d = ref[i][t] - lp[i][t]
                loss += beta * (math.exp(d) - d - 1)
            tok[i][t] = loss
    if agg == "token-mean":
        s = sum(tok[i][t] for i in range(N) for t in range(L) if mask[i][t])
        return s / sum(mask[i][t] for i in range(N) for t in range(L))
    if agg == "seq-mean-token-mean":
        seqs = []
        for i in range(N):
            n = sum(mask[i])
            if n:
                seqs.append(sum(tok[i][t] for t in range(L) if mask[i][t]) / n)
        return sum(seqs) / len(seqs)
    s = sum(tok[i][t] for i in range(N) for t in range(L) if mask[i][t])
    return s / (N * C)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_grpo_loss_matches_reference(agg, beta):
    torch.manual_seed(0)
    N, L, G = 8, 11, 4
    old = -torch.rand(N, L, dtype=torch.float64) * 3
    lp = (old + 0.5 * torch.randn(N, L, dtype=torch.float64)).requires_grad_(True)  # big ratios: clipping active
    ref = old + 0.3 * torch.randn(N, L, dtype=torch.float64)
    rewards = torch.rand(N, dtype=torch.float64)
    adv = grpo_advantages(rewards, G).double()
    lengths = torch.tensor([11, 5, 1, 8, 0, 11, 3, 7])  # one empty response
    mask = torch.arange(L)[None, :] < lengths[:, None]
    loss, extras = grpo_policy_loss(lp, old, adv, mask, eps_low=0.2, eps_high=0.28, ref_logprobs=ref, beta=beta, agg=agg, drgrpo_constant=16)
    expected = _reference_loss(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), ref.tolist(), 0.2, 0.28, beta, agg, 16)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert 0.05 < extras["clip_frac"].item() < 0.95  # clipping is active on this input
    kl_ref = (k3_kl(lp.detach().float(), ref.float()) * mask).sum() / mask.sum()
    assert extras["kl_mean"].item() == pytest.approx(kl_ref.item(), rel=1e-5)
    assert extras["num_tokens"].item() == lengths.sum().item()
    loss.backward()
    assert torch.isfinite(lp.grad).all()
    assert torch.all(lp.grad[~mask] == 0)


def test_grpo_loss_on_policy_gradient():
    """At ρ = 1 with token-mean, the gradient is -A/n_tokens per token (no clipping)."""
    N, L = 4, 5
    lp = (-torch.rand(N, L)).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0])
    mask = torch.ones(N, L, dtype=torch.bool)
    loss, extras = grpo_policy_loss(lp, lp.detach(), adv, mask)
    loss.backward()
    torch.testing.assert_close(lp.grad, (-adv[:, None] / (N * L)).expand(N, L))
    assert extras["clip_frac"].item() == 0.0
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    with pytest.raises(ValueError):
        grpo_policy_loss(lp, lp.detach(), adv, mask, beta=0.1)
    with pytest.raises(ValueError):
        grpo_policy_loss(lp, lp.detach(), adv, mask, agg="sum")


def test_dual_objective():
    torch.manual_seed(1)
    lp = -torch.rand(2, 6, dtype=torch.float64)
    loss_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    rl_mask = torch.zeros(2, 6, dtype=torch.bool)
    rl_mask[0, 1] = rl_mask[1, 4] = True
    rl_loss = torch.tensor(0.7, dtype=torch.float64)
    loss, extras = dual_objective(rl_loss, lp, loss_mask, rl_mask, lam=0.1)
    keep = [(0, 0), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (1, 5)]
    ntp = sum(-lp[i, j].item() for i, j in keep) / len(keep)
    assert loss.item() == pytest.approx(0.7 + 0.1 * ntp, rel=1e-12)
    assert extras["ntp_tokens"].item() == len(keep)


# ---------------------------------------------------------------------------------- prompts
def test_build_prompt():
    p = build_prompt("The cat {sat} on the", 123)
    assert "The cat {sat} on the" in p and "123" in p and "<answer>" in p
    p = build_prompt("x", 5, answer_format="boxed")
    assert "\\boxed{}" in p
    custom = "Budget {budget}. {context}"
    assert build_prompt("ctx", 7, template=custom) == "Budget 7. ctx"
    with pytest.raises(ValueError):
        build_prompt("ctx", 7, template="{budget} only")
    with pytest.raises(ValueError):
        build_prompt("ctx", 7, template="{context} {foo}")
    with pytest.raises(ValueError):
        build_prompt("ctx", 7, answer_format="json")
