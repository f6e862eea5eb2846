"""The model builder expresses the Llama-3 / Qwen2 / Qwen3 / SmolLM3 architecture features.

All models are built (once, in a single spawned rank so megatron's parallel
state and the CPU layer never touch the pytest process) from
``megatron_midtrain.model.builder`` with weights from ``init_parameters``, which
gives every variant the same values for the tensors they share. Checks:

* the parameters each feature implies exist (QKV bias, per-head QK-norm,
  separate output layer when untied) and are absent otherwise; GQA shapes;
* RoPE scaling changes the rotary frequencies;
* forward and backward are finite;
* NoPE: a layer flagged in ``no_rope_layers`` really skips RoPE. Property used:
  inserting a token that nobody may attend to (attention mask) shifts the
  absolute positions of everything after it. Causal attention without any
  positional signal cannot notice, so an all-NoPE model gives the same logits
  on the real tokens; a RoPE model sees the relative distances across the gap
  change and gives different logits.
"""

import numpy as np
import pytest
import torch

from megatron_midtrain.testing.distributed import run_distributed

LAYERS = 4
SEQ = 12
GAP_AT = 6  # position of the inserted, invisible token
VOCAB = 256

BASE = dict(num_layers=LAYERS, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
            num_query_groups=2, vocab_size=VOCAB, max_position_embeddings=64, tie_embeddings=True)

VARIANTS = {
    # GQA (4 query heads, 2 KV groups), untied embeddings, Llama-3.1 RoPE scaling
    "llama3": dict(tie_embeddings=False, rope_theta=500000.0, rope_scaling_factor=8.0),
    "llama3_unscaled": dict(tie_embeddings=False, rope_theta=500000.0),
    "qwen2": dict(qkv_bias=True, rope_theta=1000000.0),
    "qwen3": dict(qk_norm=True, num_query_groups=1, rope_theta=1000000.0),
    # SmolLM3: every 4th layer without RoPE, tied embeddings
    "smollm3": dict(no_rope_layers=[0, 0, 0, 1]),
    "rope_all": dict(),
    "rope_flags_zero": dict(no_rope_layers=[0] * LAYERS),
    "nope_all": dict(no_rope_layers=[1] * LAYERS),
}


def _causal_mask(n: int, invisible: int | None = None) -> torch.Tensor:
    """megatron convention: True = attention forbidden. ``invisible``: a key no other query may see."""
    mask = torch.ones(n, n, dtype=torch.bool).triu(1)
    if invisible is not None:
        mask[:, invisible] = True
        mask[invisible, invisible] = False  # its own row keeps one key (no all-masked softmax row)
    return mask.view(1, 1, n, n)


def _build_all() -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from megatron_midtrain.config.schema import ModelConfig, ParallelConfig
    from megatron_midtrain.model.builder import build_gpt_stage, build_transformer_config
    from megatron_midtrain.model.init import init_parameters
    from megatron_midtrain.utils import cpu_compat

    cpu_compat.activate()
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)

    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    filler = torch.randint(0, VOCAB, (2, 1), generator=gen)
    gapped = torch.cat([tokens[:, :GAP_AT], filler, tokens[:, GAP_AT:]], dim=1)
    real = [i for i in range(SEQ + 1) if i != GAP_AT]
    positions = torch.arange(SEQ).expand(2, SEQ)
    reset_positions = torch.cat([torch.arange(GAP_AT), torch.arange(SEQ - GAP_AT)]).expand(2, SEQ)

    out = {}
    for name, overrides in VARIANTS.items():
        model_cfg = ModelConfig(name=name, **{**BASE, **overrides})
        config = build_transformer_config(model_cfg, ParallelConfig(), torch.float32)
        model = build_gpt_stage(model_cfg, config, SEQ, use_te=False)
        init_parameters([model], 1234, 0.05, LAYERS)  # a larger std than 0.02 keeps differences visible
        model.eval()

        logits = model(tokens, positions, _causal_mask(SEQ))
        logits.float().logsumexp(-1).sum().backward()
        grads_finite = all(p.grad is not None and torch.isfinite(p.grad).all().item() for p in model.parameters())
        with torch.no_grad():
            plain = model(tokens, positions, None)  # is_causal path of the SDPA core attention
            gap = model(gapped, torch.arange(SEQ + 1).expand(2, SEQ + 1), _causal_mask(SEQ + 1, GAP_AT))[:, real]
            reset = model(tokens, reset_positions, _causal_mask(SEQ))
        out[name] = {
            "params": {n: tuple(p.shape) for n, p in model.named_parameters()},
            "no_rope_freq": config.no_rope_freq,
            "inv_freq": model.rotary_pos_emb.inv_freq.detach().clone().numpy(),
            "logits_shape": tuple(logits.shape),
            "finite": bool(torch.isfinite(logits).all()),
            "grads_finite": grads_finite,
            "logits": logits.detach().numpy(),
            "plain": plain.numpy(),
            "gap": gap.numpy(),
            "reset_positions": reset.numpy(),
        }
        del model
    parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def models():
    return run_distributed(_build_all, 1, backend="gloo")[0]


def _layer_params(params: dict, suffix: str) -> list:
    return [n for n in params if n.startswith("decoder.layers.") and n.endswith(suffix)]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_backward_finite(models, name):
    m = models[name]
    assert m["logits_shape"] == (2, SEQ, VOCAB)
    assert m["finite"] and m["grads_finite"]
    # The explicit causal mask and SDPA's is_causal path agree.
    np.testing.assert_allclose(m["logits"], m["plain"], rtol=1e-5, atol=1e-5)


def test_llama3_gqa_untied_scaled_rope(models):
    p = models["llama3"]["params"]
    head_dim = BASE["hidden_size"] // BASE["num_attention_heads"]
    qkv = (BASE["num_attention_heads"] + 2 * BASE["num_query_groups"]) * head_dim
    assert p["decoder.layers.0.self_attention.linear_qkv.weight"] == (qkv, BASE["hidden_size"])
    assert p["output_layer.weight"] == (VOCAB, BASE["hidden_size"])
    assert p["embedding.word_embeddings.weight"] == (VOCAB, BASE["hidden_size"])
    assert not _layer_params(p, "linear_qkv.bias") and not _layer_params(p, "q_layernorm.weight")
    # No biases anywhere else (add_bias_linear=False), SwiGLU fc1 = gate and up fused.
    assert [n for n in p if n.endswith(".bias")] == []
    assert p["decoder.layers.0.mlp.linear_fc1.weight"] == (2 * BASE["ffn_hidden_size"], BASE["hidden_size"])

    scaled, unscaled = models["llama3"]["inv_freq"], models["llama3_unscaled"]["inv_freq"]
    assert scaled.shape == unscaled.shape
    assert scaled[0] == pytest.approx(unscaled[0])  # the highest frequency is kept
    assert scaled[-1] == pytest.approx(unscaled[-1] / 8.0, rel=1e-5)  # the lowest is divided by the factor
    assert not np.allclose(models["llama3"]["logits"], models["llama3_unscaled"]["logits"])


def test_qwen2_qkv_bias(models):
    p = models["qwen2"]["params"]
    head_dim = BASE["hidden_size"] // BASE["num_attention_heads"]
    biases = _layer_params(p, "self_attention.linear_qkv.bias")
    assert len(biases) == LAYERS
    assert p[biases[0]] == ((BASE["num_attention_heads"] + 2 * BASE["num_query_groups"]) * head_dim,)
    assert not _layer_params(p, "linear_proj.bias") and not _layer_params(p, "linear_fc1.bias")
    assert "output_layer.weight" not in p  # tied


def test_qwen3_qk_norm(models):
    p = models["qwen3"]["params"]
    head_dim = BASE["hidden_size"] // BASE["num_attention_heads"]
    assert len(_layer_params(p, "self_attention.q_layernorm.weight")) == LAYERS
    assert len(_layer_params(p, "self_attention.k_layernorm.weight")) == LAYERS
    assert p["decoder.layers.0.self_attention.q_layernorm.weight"] == (head_dim,)  # per head, shared by heads
    # MQA (one KV group) is expressible too.
    assert p["decoder.layers.0.self_attention.linear_qkv.weight"] == ((BASE["num_attention_heads"] + 2) * head_dim, BASE["hidden_size"])
    assert not _layer_params(p, "linear_qkv.bias")


def test_smollm3_nope_layers_tied(models):
    m = models["smollm3"]
    assert m["no_rope_freq"] == [0, 0, 0, 1]
    assert "output_layer.weight" not in m["params"]
    assert "embedding.word_embeddings.weight" in m["params"]
    # Same weights as rope_all; skipping RoPE in the last layer must change the output.
    assert np.abs(m["logits"] - models["rope_all"]["logits"]).max() > 1e-3


def test_zero_flags_equal_rope_everywhere(models):
    np.testing.assert_array_equal(models["rope_flags_zero"]["logits"], models["rope_all"]["logits"])


def test_nope_model_is_position_free(models):
    # Inserting an invisible token shifts the positions of the tokens after it by one.
    nope, rope, smol = models["nope_all"], models["rope_all"], models["smollm3"]
    np.testing.assert_allclose(nope["gap"], nope["plain"], rtol=1e-5, atol=1e-5)
    # Before the gap nothing changes for any model (causal), after it only position-aware ones change.
    np.testing.assert_allclose(rope["gap"][:, :GAP_AT], rope["plain"][:, :GAP_AT], rtol=1e-5, atol=1e-5)
    assert np.abs(rope["gap"][:, GAP_AT:] - rope["plain"][:, GAP_AT:]).max() > 1e-3
    assert np.abs(smol["gap"][:, GAP_AT:] - smol["plain"][:, GAP_AT:]).max() > 1e-3


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "megatron-core GPTModel with position_embedding_type='rope' builds RoPE from arange(seq_len) "
    "and ignores position_ids, so data.reset_position_ids has no effect on RoPE models"))
def test_rope_uses_position_ids(models):
    rope = models["rope_all"]
    assert np.abs(rope["reset_positions"] - rope["logits"]).max() > 1e-3
