"""Core attention: the SDPA path against a hand-written softmax, and the Transformer Engine
wrapper's dispatch (TE itself needs a GPU; its stand-in here records what it is asked)."""

import math

import torch

from megatron_midtrain.model.sdpa_attention import mask_aware_attention, sdpa_core_attention
from megatron.core.transformer.enums import AttnMaskType


def _reference(q, k, v, forbidden):
    """softmax(QK^T / sqrt(d) + mask) V in megatron's [s, b, h, d] layout, GQA by repetition."""
    heads, groups = q.shape[2], k.shape[2]
    k = k.repeat_interleave(heads // groups, dim=2)
    v = v.repeat_interleave(heads // groups, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(forbidden, float("-inf"))
    out = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v)
    return out.reshape(out.shape[0], out.shape[1], -1)


def _inputs(s=6, b=2, heads=4, groups=2, d=8):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(s, b, heads, d, generator=gen)
    k = torch.randn(s, b, groups, d, generator=gen)
    v = torch.randn(s, b, groups, d, generator=gen)
    # row 0: two left-padding positions (keys 0, 1 forbidden, each query still sees itself)
    forbidden = torch.ones(s, s, dtype=torch.bool).triu(1).expand(b, 1, s, s).clone()
    forbidden[0, :, :, :2] = True
    forbidden[0, :, torch.arange(s), torch.arange(s)] = False
    return q, k, v, forbidden


def test_sdpa_with_an_explicit_mask_matches_the_reference():
    q, k, v, forbidden = _inputs()
    got = sdpa_core_attention(q, k, v, forbidden, AttnMaskType.causal, 1 / math.sqrt(q.shape[-1]))
    torch.testing.assert_close(got, _reference(q, k, v, forbidden), rtol=1e-5, atol=1e-6)
    # and without a mask, SDPA's causal path is the plain causal softmax
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    got = sdpa_core_attention(q, k, v, None, AttnMaskType.causal, 1 / math.sqrt(q.shape[-1]))
    torch.testing.assert_close(got, _reference(q, k, v, causal), rtol=1e-5, atol=1e-6)


class _FakeTEAttention(torch.nn.Module):
    """Stands in for TEDotProductAttention: causal, ignores the mask tensor (as TE does when
    megatron hands it attn_mask_type=causal), and records its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.softmax_scale = None
        self.config = type("Config", (), {"attention_dropout": 0.0})()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        self.calls += 1
        return sdpa_core_attention(query, key, value, None, AttnMaskType.causal, 1 / math.sqrt(query.shape[-1]))


def test_te_wrapper_uses_te_without_a_mask_and_sdpa_with_one():
    q, k, v, forbidden = _inputs()
    attention = mask_aware_attention(_FakeTEAttention)()
    assert mask_aware_attention(_FakeTEAttention) is type(attention)  # one class per base
    plain = attention(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    assert attention.calls == 1
    masked = attention(q, k, v, forbidden, attn_mask_type=AttnMaskType.causal)
    assert attention.calls == 1  # the masked call did not reach "TE"
    torch.testing.assert_close(masked, _reference(q, k, v, forbidden), rtol=1e-5, atol=1e-6)
    # the base alone would have attended to the padding of row 0
    assert not torch.allclose(plain[:, 0], masked[:, 0], atol=1e-4)
    torch.testing.assert_close(plain[:, 1], masked[:, 1])
