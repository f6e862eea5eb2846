"""Self-attention whose static KV cache holds keys with RoPE already applied.

megatron-core's static-batching KV cache (``StaticInferenceContext``, what
:func:`megatron_midtrain.rl.generation.generate` uses) stores the keys *before* the rotary
embedding and, at every decode step, rotates the whole cache again (``cos``/``sin`` of every
cached position, ``rotate_half``, two ``cat``\\ s per layer): per new token, work proportional to
the tokens generated so far, in every layer. On the CPU demo model that re-rotation was the
largest single cost of a decode step (cProfile: ~60% of ``generate``).

:class:`RotatedKeySelfAttention` rotates each key once, when it enters the cache (at its own
position, with the same ``apply_rotary_pos_emb`` megatron would use), and tells megatron's
``Attention.forward`` that the keys need no further rotation (``k_pos_emb=None``); the query is
rotated exactly as before. RoPE is elementwise per position, so the attention inputs are the same
numbers as megatron's re-rotated ones up to the last bit of ``cos``/``sin`` (a vectorised and a
scalar evaluation of one element may differ by one ulp; the re-rotation itself already varies
that way from step to step as the cache grows). The prefill rotates the same tensor megatron
would. Training and full-recompute forwards (no inference context), dynamic batching and
``flash_decode`` (which already caches rotated keys) take megatron's own path unchanged.
"""

from __future__ import annotations

from megatron.core.inference.contexts import BaseInferenceContext
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor_from_config
from megatron.core.transformer.attention import SelfAttention
from megatron.core.utils import deprecate_inference_params


class RotatedKeyCache:
    """Mixin for a megatron ``Attention`` subclass: cache RoPE-rotated keys (module docstring)."""

    def _adjust_key_value_for_inference(self, inference_context: BaseInferenceContext, query, key, value, rotary_pos_emb,
                                        rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                                        sequence_len_offset=None, *, inference_params=None):
        context = deprecate_inference_params(inference_context, inference_params)
        if (context is None or not context.is_static_batching() or rotary_pos_emb is None or self.config.flash_decode
                or not isinstance(rotary_pos_emb, tuple) or rotary_pos_emb[1] is None):
            return super()._adjust_key_value_for_inference(context, query, key, value, rotary_pos_emb, rotary_pos_cos,
                                                           rotary_pos_sin, rotary_pos_cos_sin, sequence_len_offset)
        q_pos_emb, k_pos_emb = rotary_pos_emb
        start = context.sequence_len_offset
        key = apply_rotary_pos_emb(key, k_pos_emb[start:start + key.size(0)], config=self.config,
                                   mscale=_yarn_get_concentration_factor_from_config(self.config),
                                   cp_group=self.pg_collection.cp)
        query, key, value, (q_pos_emb, _), mask_type, block_table = super()._adjust_key_value_for_inference(
            context, query, key, value, (q_pos_emb, k_pos_emb), rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin,
            sequence_len_offset)
        return query, key, value, (q_pos_emb, None), mask_type, block_table


class RotatedKeySelfAttention(RotatedKeyCache, SelfAttention):
    """megatron's ``SelfAttention`` with a rotated-key KV cache (module docstring)."""
