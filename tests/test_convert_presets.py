"""Model presets carry the published architecture numbers, and the importer maps each published
config.json onto exactly that preset; plus the transforms' layouts and inverses."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import yaml

from megatron_midtrain.config.schema import ModelConfig
from megatron_midtrain.convert.families import hf_config_from_model, model_config_from_hf
from megatron_midtrain.convert.transforms import GateUpFuse, QKVInterleave, VocabPad

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "model")

# Architecture fields of the published config.json files (Hugging Face hub).
PUBLISHED = {
    "olmo2_1b": {  # allenai/OLMo-2-0425-1B
        "model_type": "olmo2", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 100352, "max_position_embeddings": 4096,
        "rope_theta": 500000, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False},
    "smollm3_3b": {  # HuggingFaceTB/SmolLM3-3B
        "model_type": "smollm3", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 128256, "max_position_embeddings": 65536,
        "rope_theta": 5000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "no_rope_layer_interval": 4,
        "no_rope_layers": [1, 1, 1, 0] * 9, "use_sliding_window": False},
    "qwen3_1p7b": {  # Qwen/Qwen3-1.7B
        "model_type": "qwen3", "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "max_position_embeddings": 40960, "rope_theta": 1000000, "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
    "qwen3_8b": {  # Qwen/Qwen3-8B
        "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "max_position_embeddings": 40960, "rope_theta": 1000000, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "qwen3_14b": {  # Qwen/Qwen3-14B
        "model_type": "qwen3", "hidden_size": 5120, "intermediate_size": 17408, "num_hidden_layers": 40,
        "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "max_position_embeddings": 40960, "rope_theta": 1000000, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "llama3p1_8b": {  # meta-llama/Llama-3.1-8B
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
}
IGNORED = {"name", "init_std"}


def load_preset(name: str) -> ModelConfig:
    with open(os.path.join(CONF, f"{name}.yaml")) as fh:
        return ModelConfig(**yaml.safe_load(fh))


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_matches_published_config(preset):
    _, imported = model_config_from_hf(PUBLISHED[preset], preset)
    want, got = dataclasses.asdict(load_preset(preset)), dataclasses.asdict(imported)
    diff = {k: (want[k], got[k]) for k in want if k not in IGNORED and want[k] != got[k]}
    assert not diff, diff


def test_smollm3_nope_flags_are_inverted_both_ways():
    family, model = model_config_from_hf(PUBLISHED["smollm3_3b"], "smollm3")
    assert [i for i, f in enumerate(model.no_rope_layers) if f] == [3, 7, 11, 15, 19, 23, 27, 31, 35]
    assert hf_config_from_model(family, model, "bfloat16")["no_rope_layers"] == [1, 1, 1, 0] * 9


def test_qkv_interleave_layout_and_inverse():
    heads, groups, d, width = 4, 2, 3, 5
    q = torch.arange(heads * d * width, dtype=torch.float32).reshape(heads * d, width)
    k = -1 - torch.arange(groups * d * width, dtype=torch.float32).reshape(groups * d, width)
    v = 1000 + torch.arange(groups * d * width, dtype=torch.float32).reshape(groups * d, width)
    t = QKVInterleave(heads, groups, d)
    fused = t.to_megatron([q, k, v])
    # group 0: q heads 0,1 then k head 0 then v head 0; group 1: q heads 2,3, k 1, v 1
    expect = torch.cat([q[0:6], k[0:3], v[0:3], q[6:12], k[3:6], v[3:6]])
    assert torch.equal(fused, expect)
    assert all(torch.equal(a, b) for a, b in zip(t.to_hf(fused), [q, k, v]))
    bias = t.to_megatron([q[:, 0], k[:, 0], v[:, 0]])
    assert torch.equal(bias, expect[:, 0])


def test_gate_up_and_vocab_padding_inverse():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fused = GateUpFuse().to_megatron([gate, up])
    assert torch.equal(fused[:6], gate) and torch.equal(fused[6:], up)
    assert all(torch.equal(a, b) for a, b in zip(GateUpFuse().to_hf(fused), [gate, up]))
    emb = torch.randn(10, 4)
    padded = VocabPad(10, 16).to_megatron([emb])
    assert padded.shape == (16, 4) and not padded[10:].any()
    assert torch.equal(VocabPad(10, 16).to_hf(padded)[0], emb)
