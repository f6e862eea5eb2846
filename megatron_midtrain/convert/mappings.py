"""The declarative conversion table: which HF tensors make each megatron tensor, and how.

Megatron names are the *sharded* (checkpoint) keys, which are the same for megatron's
local and Transformer Engine layer specs (e.g. the pre-attention RMSNorm is stored as
``self_attention.linear_qkv.layer_norm_weight`` in both). Per-layer megatron tensors are
stacked along a leading layer axis in the checkpoint, so their keys carry no layer index;
HF names use ``{layer}``.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_midtrain.config.schema import ModelConfig
from megatron_midtrain.convert.transforms import GateUpFuse, Identity, QKVInterleave, Transform, VocabPad

LAYER_PREFIX = "decoder.layers."
HF_LAYER = "model.layers.{layer}."


@dataclass(frozen=True)
class Mapping:
    megatron: str
    hf: tuple[str, ...]
    transform: Transform

    @property
    def per_layer(self) -> bool:
        return self.megatron.startswith(LAYER_PREFIX)

    def hf_names(self, layer: int | None) -> list[str]:
        return [name.format(layer=layer) for name in self.hf]


def padded_vocab_size(model: ModelConfig) -> int:
    """Same rule as ``model.builder.padded_vocab_size`` (kept here so that input checks do not
    import megatron-core): a multiple of ``make_vocab_size_divisible_by``, independent of TP."""
    multiple = model.make_vocab_size_divisible_by
    return -(-model.vocab_size // multiple) * multiple


def build_mappings(model: ModelConfig) -> list[Mapping]:
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    head_dim = model.head_dim or model.hidden_size // heads
    vocab = VocabPad(model.vocab_size, padded_vocab_size(model))
    qkv = QKVInterleave(heads, groups, head_dim)
    attn, mlp, L = "decoder.layers.self_attention.", "decoder.layers.mlp.", HF_LAYER

    table = [
        Mapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), vocab),
        Mapping("decoder.final_layernorm.weight", ("model.norm.weight",), Identity()),
        Mapping(attn + "linear_qkv.weight", tuple(f"{L}self_attn.{p}_proj.weight" for p in "qkv"), qkv),
        Mapping(attn + "linear_proj.weight", (f"{L}self_attn.o_proj.weight",), Identity()),
        Mapping(mlp + "linear_fc1.weight", (f"{L}mlp.gate_proj.weight", f"{L}mlp.up_proj.weight"), GateUpFuse()),
        Mapping(mlp + "linear_fc2.weight", (f"{L}mlp.down_proj.weight",), Identity()),
    ]
    if not model.tie_embeddings:
        table.append(Mapping("output_layer.weight", ("lm_head.weight",), vocab))
    if model.qkv_bias:
        table.append(Mapping(attn + "linear_qkv.bias", tuple(f"{L}self_attn.{p}_proj.bias" for p in "qkv"), qkv))
    if model.qk_norm:
        # Per-head (Qwen3: [head_dim]) or full width (OLMo-2: [heads * head_dim], heads in
        # order, which is also megatron's order): either way the same vector.
        table.append(Mapping(attn + "q_layernorm.weight", (f"{L}self_attn.q_norm.weight",), Identity()))
        table.append(Mapping(attn + "k_layernorm.weight", (f"{L}self_attn.k_norm.weight",), Identity()))
    if model.norm_placement == "pre":
        table.append(Mapping(attn + "linear_qkv.layer_norm_weight", (f"{L}input_layernorm.weight",), Identity()))
        table.append(Mapping(mlp + "linear_fc1.layer_norm_weight", (f"{L}post_attention_layernorm.weight",), Identity()))
    else:  # OLMo-2: the norms sit on the branch outputs (model/olmo2.py)
        table.append(Mapping(attn + "post_norm.weight", (f"{L}post_attention_layernorm.weight",), Identity()))
        table.append(Mapping(mlp + "post_norm.weight", (f"{L}post_feedforward_layernorm.weight",), Identity()))
    return table


#: HF tensors that carry no weights (recomputed buffers) and are skipped on import.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_hf_names(table: list[Mapping], num_layers: int) -> dict[str, tuple[Mapping, int | None, int]]:
    """Every HF tensor the table reads: name -> (mapping, layer, position in the mapping)."""
    out = {}
    for m in table:
        for layer in (range(num_layers) if m.per_layer else [None]):
            for i, name in enumerate(m.hf_names(layer)):
                out[name] = (m, layer, i)
    return out
