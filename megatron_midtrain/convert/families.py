"""Supported Hugging Face model families and their ``config.json`` <-> ``ModelConfig`` rules.

Each family is a Llama-shaped decoder (RMSNorm, SwiGLU, RoPE, GQA) plus a few switches,
all of which ``model.builder`` already expresses:

==========  =================================================================
llama       Llama 3 / 3.1 (optionally with "llama3" RoPE scaling)
qwen2       Qwen2 / Qwen2.5: bias on q/k/v (not on o_proj)
qwen3       Qwen3: per-head RMSNorm on q and k, explicit head_dim
olmo2       OLMo-2: post-norm blocks, RMSNorm on the full q / k projection width
smollm3     SmolLM3: NoPE layers. HF ``no_rope_layers[i] == 1`` means layer i USES
            RoPE; ``ModelConfig.no_rope_layers`` (like megatron's ``no_rope_freq``) uses
            1 for "skip RoPE", so the flags are inverted both ways.
==========  =================================================================

Anything a family cannot express (sliding windows, MLP or output biases, other RoPE
scalings, other activations) is refused with a ``UserError`` instead of being dropped.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from megatron_midtrain.config.schema import ModelConfig
from megatron_midtrain.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    """HF ``model_type``."""
    architecture: str
    """HF ``architectures[0]`` written on export."""
    norm_placement: str = "pre"
    qk_norm_scope: str | None = None
    """None (no QK-norm), "head" (Qwen3) or "full" (OLMo-2)."""
    qkv_bias: bool = False
    nope: bool = False
    """Honours per-layer NoPE flags (SmolLM3)."""
    tie_default: bool = False
    """``tie_word_embeddings`` when config.json does not say."""
    sliding_window_keys: bool = False
    """Writes Qwen-style ``use_sliding_window`` / ``max_window_layers`` keys."""


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaForCausalLM"),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True, sliding_window_keys=True),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", qk_norm_scope="head", sliding_window_keys=True),
    "olmo2": Family("olmo2", "Olmo2ForCausalLM", norm_placement="post", qk_norm_scope="full"),
    "smollm3": Family("smollm3", "SmolLM3ForCausalLM", nope=True, tie_default=True),
}


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def get_family(name: str | None, where: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"{where}: model family {name!r} is not supported", f"supported families: {supported()}")
    return FAMILIES[name]


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{hf_dir} has no config.json", "point --hf-dir at a Hugging Face model folder (config.json + *.safetensors)")
    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}", "restore a valid config.json") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} is not a JSON object", "restore a valid config.json")
    return cfg


def _rope(cfg: dict, where: str) -> tuple[float, float | None]:
    """``(rope_theta, llama3 scaling factor or None)`` from legacy (``rope_theta`` /
    ``rope_scaling``) or transformers-5 (``rope_parameters``) keys."""
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return float(theta), None
    # megatron-core implements exactly Llama 3.1's scaling (low/high frequency factors 1 and 4
    # over an original context of 8192); anything else would silently change the model.
    expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if kind != "llama3" or any(float(scaling.get(k, v)) != v for k, v in expected.items()):
        raise UserError(
            f"{where}: RoPE scaling {scaling} is not supported",
            "only Llama 3.1 style scaling (rope_type llama3, low/high_freq_factor 1/4, original 8192) converts",
        )
    return float(theta), float(scaling["factor"])


def _refuse_if(cond: bool, where: str, what: str) -> None:
    if cond:
        raise UserError(f"{where}: {what} is not supported by the conversion", f"supported families: {supported()} without that option")


def _vocab_divisor(vocab: int) -> int:
    """Largest power of two <= 128 dividing the vocabulary: no padding rows, so the model's
    softmax is exactly Hugging Face's (padding rows would add zero logits to it)."""
    divisor = 128
    while vocab % divisor:
        divisor //= 2
    return divisor


def model_config_from_hf(cfg: dict, where: str) -> tuple[Family, ModelConfig]:
    """HF config.json -> (family, ModelConfig); refuses what the family cannot express."""
    family = get_family(cfg.get("model_type"), where)
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        ffn = int(cfg["intermediate_size"])
        vocab = int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{where}: config.json lacks a usable {err}", "restore the model's original config.json") from None
    act = cfg.get("hidden_act", "silu")
    _refuse_if(act != "silu", where, f"hidden_act={act!r}")
    _refuse_if(bool(cfg.get("mlp_bias")), where, "mlp_bias=true")
    if not family.qkv_bias:
        _refuse_if(bool(cfg.get("attention_bias")), where, "attention_bias=true (bias on o_proj)")
    _refuse_if(bool(cfg.get("use_sliding_window")), where, "use_sliding_window=true")
    layer_types = cfg.get("layer_types") or []
    _refuse_if(any(t != "full_attention" for t in layer_types), where, f"layer_types {sorted(set(layer_types))}")
    theta, scaling = _rope(cfg, where)
    no_rope = None
    if family.nope:
        flags = cfg.get("no_rope_layers")
        if flags is None:  # transformers' SmolLM3Config default: every interval-th layer is NoPE
            interval = int(cfg.get("no_rope_layer_interval", 4))
            flags = [int((i + 1) % interval != 0) for i in range(layers)]
        if len(flags) != layers:
            raise UserError(f"{where}: no_rope_layers has {len(flags)} entries for {layers} layers", "restore the original config.json")
        # HF: 1 = use RoPE. Ours (and megatron's no_rope_freq): 1 = skip RoPE.
        no_rope = [0 if int(f) else 1 for f in flags]
        if not any(no_rope):
            no_rope = None
    groups = int(cfg.get("num_key_value_heads") or heads)
    head_dim = cfg.get("head_dim")
    head_dim = int(head_dim) if head_dim else None  # kept when config.json states it (Qwen3 does)
    model = ModelConfig(
        name=str(cfg.get("_name_or_path") or f"{family.name}-hf").rstrip("/").split("/")[-1] or f"{family.name}-hf",
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        vocab_size=vocab,
        make_vocab_size_divisible_by=_vocab_divisor(vocab),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rope_theta=theta,
        rope_scaling_factor=scaling,
        no_rope_layers=no_rope,
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        qkv_bias=family.qkv_bias,
        qk_norm=family.qk_norm_scope is not None,
        qk_norm_scope=family.qk_norm_scope or "head",
        norm_placement=family.norm_placement,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", family.tie_default)),
        init_std=float(cfg.get("initializer_range", 0.02)),
    )
    return family, model


def infer_family(model: ModelConfig) -> Family:
    """The family whose switches match a ModelConfig (for checkpoints not imported from HF)."""
    for family in FAMILIES.values():
        if fits(family, model) is None:
            if family.nope and not model.no_rope_layers:
                continue  # plain Llama is the better name
            return family
    raise UserError(
        f"no supported Hugging Face family has this architecture (qkv_bias={model.qkv_bias}, qk_norm={model.qk_norm}/"
        f"{model.qk_norm_scope}, norm_placement={model.norm_placement}, no_rope_layers={bool(model.no_rope_layers)})",
        f"supported families: {supported()}",
    )


def fits(family: Family, model: ModelConfig) -> str | None:
    """None if ``family`` expresses ``model`` exactly, else the first difference."""
    qk = model.qk_norm_scope if model.qk_norm else None
    if qk != family.qk_norm_scope:
        return f"QK-norm {qk or 'off'} (the family has {family.qk_norm_scope or 'none'})"
    if model.qkv_bias != family.qkv_bias:
        return f"qkv_bias={model.qkv_bias}"
    if model.norm_placement != family.norm_placement:
        return f"norm_placement={model.norm_placement}"
    if model.no_rope_layers and any(model.no_rope_layers) and not family.nope:
        return "NoPE layers"
    return None


def hf_config_from_model(family: Family, model: ModelConfig, dtype: str, base: dict | None = None) -> dict:
    """config.json for ``model`` as ``family``. ``base`` (the config the checkpoint was
    imported from, if any) keeps fields we do not model, e.g. bos/eos token ids."""
    cfg: dict[str, Any] = {
        k: v for k, v in (base or {}).items()
        if k not in ("rope_parameters", "rope_scaling", "rope_theta", "torch_dtype", "dtype", "transformers_version",
                     "_name_or_path", "architectures", "auto_map")
    }
    heads = model.num_attention_heads
    cfg.update(
        architectures=[family.architecture],
        model_type=family.name,
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=model.num_query_groups or heads,
        head_dim=model.head_dim or model.hidden_size // heads,
        hidden_act="silu",
        max_position_embeddings=model.max_position_embeddings,
        rms_norm_eps=model.norm_epsilon,
        rope_theta=model.rope_theta,
        rope_scaling=(
            {"rope_type": "llama3", "factor": model.rope_scaling_factor, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
            if model.rope_scaling_factor else None
        ),
        tie_word_embeddings=model.tie_embeddings,
        attention_bias=family.qkv_bias,
        attention_dropout=0.0,
        initializer_range=model.init_std,
        torch_dtype=dtype,
        use_cache=True,
    )
    if family.name in ("llama", "smollm3"):
        cfg["mlp_bias"] = False
    if family.sliding_window_keys or family.nope:
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=model.num_layers)
    if family.nope:
        flags = model.no_rope_layers or [0] * model.num_layers
        cfg["no_rope_layers"] = [0 if f else 1 for f in flags]  # back to HF's "1 = use RoPE"
        cfg.setdefault("no_rope_layer_interval", 4)
    cfg.pop("layer_types", None)
    return cfg


def model_config_dict(model: ModelConfig) -> dict:
    return asdict(model)
