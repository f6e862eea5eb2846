"""Build megatron-core ``GPTModel`` stages from a :class:`ModelConfig`.

One builder covers the Llama-3 / Qwen2 / Qwen3 / SmolLM3 family: RMSNorm,
SwiGLU, RoPE (optionally scaled, optionally skipped per layer = NoPE), GQA,
tied or untied embeddings, QKV bias and per-head QK-norm are all flags of
megatron-core's ``TransformerConfig``. On GPUs with Transformer Engine the TE
layer spec is used (fused kernels, bf16); otherwise megatron's local spec with
an SDPA core attention (fp32 on the CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_midtrain.config.schema import ModelConfig, ParallelConfig
from megatron_midtrain.model.norms import RMSNorm
from megatron_midtrain.model.olmo2 import FullWidthQKNorm, PostNormMLP, PostNormSelfAttention
from megatron_midtrain.model.rotary_cache import RotatedKeySelfAttention
from megatron_midtrain.model.sdpa_attention import SDPAttention, mask_aware_attention


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA install
        return False
    return torch.cuda.is_available()


def padded_vocab_size(model: ModelConfig, tp: int) -> int:
    """Pad the vocabulary to a multiple of ``make_vocab_size_divisible_by``.

    Unlike Megatron-LM (multiple of ``divisible_by * tp``) the padding does not depend on
    TP, so the embedding has the same shape at every TP size and checkpoints reshard
    freely; ``check_layout`` makes sure the padded size splits evenly across TP ranks.
    """
    multiple = model.make_vocab_size_divisible_by
    return ((model.vocab_size + multiple - 1) // multiple) * multiple


def build_transformer_config(model: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype) -> TransformerConfig:
    on_gpu = torch.cuda.is_available()
    no_rope = list(model.no_rope_layers) if model.no_rope_layers else None
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups or model.num_attention_heads,
        kv_channels=model.head_dim or model.hidden_size // model.num_attention_heads,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sequence_parallel,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        qk_layernorm=model.qk_norm,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_std,
        no_rope_freq=no_rope,
        # Weights are filled afterwards by model.init.init_parameters (parallelism-invariant).
        # megatron's initialisation must still run: it is what tags each weight with its
        # tensor-parallel attributes (without them the grad norm ignores TP shards on
        # ranks > 0). A zero fill keeps that pass cheap.
        perform_initialization=True,
        init_method=torch.nn.init.zeros_,
        output_layer_init_method=torch.nn.init.zeros_,
        use_cpu_initialization=not on_gpu,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Loss = sum over tokens / tokens in the *global* batch (SPEC "over the global batch").
        calculate_per_token_loss=True,
        # Fusions need CUDA kernels.
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        batch_p2p_comm=False,
        deallocate_pipeline_outputs=on_gpu,
    )


def build_layer_spec(model: ModelConfig, use_te: bool) -> ModuleSpec:
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_norm)
        attn = spec.submodules.self_attention.submodules
        # TE ignores explicit attention masks (megatron passes it only a mask type): calls
        # with one (padded rollouts, document masking) take the SDPA path instead.
        attn.core_attention = mask_aware_attention(attn.core_attention)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=model.qk_norm, normalization="RMSNorm")
        layer, attn = spec.submodules, spec.submodules.self_attention.submodules
        attn.core_attention = SDPAttention
        # Our RMSNorm instead of megatron's torch fallback (which refuses sequence parallelism).
        layer.input_layernorm = layer.pre_mlp_layernorm = RMSNorm
        if model.qk_norm:
            attn.q_layernorm = attn.k_layernorm = RMSNorm
    if model.qk_norm and model.qk_norm_scope == "full":
        attn = spec.submodules.self_attention.submodules
        attn.q_layernorm = ModuleSpec(module=FullWidthQKNorm, params={"heads": "q"})
        attn.k_layernorm = ModuleSpec(module=FullWidthQKNorm, params={"heads": "k"})
    # RoPE'd keys in the KV cache (generation): each key is rotated once, not at every step
    spec.submodules.self_attention.module = RotatedKeySelfAttention
    if model.norm_placement == "post":
        _use_post_norm(spec, use_te)
    return spec


def _use_post_norm(spec: ModuleSpec, use_te: bool) -> None:
    """OLMo-2: no pre-norms; attention and MLP normalise their own outputs (see olmo2.py)."""
    layer = spec.submodules
    layer.input_layernorm = IdentityOp
    layer.pre_mlp_layernorm = IdentityOp
    layer.self_attention.module = PostNormSelfAttention
    layer.mlp.module = PostNormMLP
    if use_te:  # TE fuses the pre-norm into the first linear; use the unfused linears instead
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

        layer.self_attention.submodules.linear_qkv = TEColumnParallelLinear
        layer.mlp.submodules.linear_fc1 = TEColumnParallelLinear


def build_gpt_stage(
    model: ModelConfig,
    transformer_config: TransformerConfig,
    seq_length: int,
    use_te: bool,
    vp_stage: int | None = None,
) -> GPTModel:
    """The GPTModel piece owned by this pipeline rank (embedding on the first, head on the last)."""
    tp = transformer_config.tensor_model_parallel_size
    spec = build_layer_spec(model, use_te)
    if not use_te:
        # The block's final norm too (megatron would pick its torch fallback for a layer spec).
        spec = TransformerBlockSubmodules(
            layer_specs=[spec] * get_num_layers_to_build(transformer_config, vp_stage=vp_stage), layer_norm=RMSNorm
        )
    return GPTModel(
        config=transformer_config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(model, tp),
        max_sequence_length=max(seq_length, model.max_position_embeddings),
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rope_theta),
        rope_scaling=model.rope_scaling_factor is not None,
        rope_scaling_factor=model.rope_scaling_factor or 8.0,
        vp_stage=vp_stage,
    )
