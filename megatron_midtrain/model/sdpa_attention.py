"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

Used with megatron-core's *local* layer spec (CPU, or GPUs without Transformer
Engine). megatron's stock ``DotProductAttention`` materialises the score matrix
in a global buffer allocated with ``torch.cuda.current_device()``; SDPA needs no
buffer, never materialises [b, h, s, s] on backends with a fused kernel, and is
numerically the same softmax(QK^T/sqrt(d))V.

With megatron's KV cache (``inference_context``) the prompt prefill arrives as usual (causal,
as many queries as keys) and each decode step with ``attn_mask_type=no_mask`` (one query
against all cached keys). A causal call with fewer queries than keys is aligned bottom-right
(the queries are the last positions), unlike SDPA's own ``is_causal``.

The same function also serves the Transformer Engine spec for calls that carry an explicit
mask (:func:`mask_aware_attention`), which TE's attention would otherwise ignore.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Drop-in ``core_attention`` for ``SelfAttentionSubmodules`` (same constructor and call)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **kwargs,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not implement context parallelism; use the TE layer spec")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(config.num_query_groups, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports neither packed sequences nor attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        return sdpa_core_attention(query, key, value, attention_mask, mask_type, self.softmax_scale,
                                   self.dropout_p if self.training else 0.0)


def sdpa_core_attention(query, key, value, attention_mask, mask_type, softmax_scale: float, dropout_p: float = 0.0):
    """megatron's core-attention contract on ``F.scaled_dot_product_attention``.

    ``query`` ``[s_q, b, heads, d]``, ``key``/``value`` ``[s_k, b, groups, d]`` (GQA when
    groups < heads); ``attention_mask`` None or bool, True where attention is *forbidden*
    (megatron's convention), broadcastable to ``[b, heads, s_q, s_k]``. Returns ``[s_q, b, heads*d]``.
    """
    # megatron layout [s, b, heads, d] -> SDPA layout [b, heads, s, d]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
    if attention_mask is None:
        attn_mask, is_causal = None, mask_type == AttnMaskType.causal
        if is_causal and q.shape[2] != k.shape[2]:
            # Queries are the *last* q_len positions of k_len (KV-cache decode/chunked
            # prefill): causal must be bottom-right aligned, SDPA's is_causal is top-left.
            # Training (q_len == k_len) never takes this branch.
            attn_mask, is_causal = _bottom_right_causal(q.shape[2], k.shape[2], q.device), False
    else:
        # megatron masks are True where attention is *forbidden*; SDPA wants True where allowed.
        attn_mask, is_causal = ~attention_mask, False
    context = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=softmax_scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    # [b, heads, s, d] -> [s, b, heads * d]
    s, b = context.shape[2], context.shape[0]
    return context.permute(2, 0, 1, 3).reshape(s, b, q.shape[1] * q.shape[3])


@functools.lru_cache(maxsize=None)
def mask_aware_attention(base: type) -> type:
    """``base`` (Transformer Engine's core attention) for every call without an explicit mask,
    :func:`sdpa_core_attention` for calls with one.

    megatron-core 0.16 hands TE only an ``attn_mask_type`` (causal, or no_mask for a decode
    step); TE then ignores the ``attention_mask`` tensor. Left-padded rollout batches (the KV
    cache's prefill and decode) and document masking (``data.reset_attention_mask``) pass one,
    and would silently attend to padding or across documents. Those calls take the SDPA path
    (flash/memory-efficient kernels on a GPU); unmasked training keeps TE's fused attention.
    """

    class MaskAwareAttention(base):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None, **kwargs):
            if attention_mask is None:
                return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                       attention_bias=attention_bias, packed_seq_params=packed_seq_params, **kwargs)
            if attention_bias is not None or packed_seq_params is not None:
                raise NotImplementedError("an explicit attention mask with attention bias or packed sequences")
            scale = getattr(self, "softmax_scale", None) or 1.0 / math.sqrt(query.shape[-1])
            dropout = self.config.attention_dropout if self.training else 0.0
            return sdpa_core_attention(query, key, value, attention_mask, attn_mask_type, scale, dropout)

    MaskAwareAttention.__name__ = MaskAwareAttention.__qualname__ = f"MaskAware{base.__name__}"
    return MaskAwareAttention


def _bottom_right_causal(q_len: int, k_len: int, device) -> torch.Tensor:
    """[q_len, k_len] bool, True where allowed: query i (position k_len - q_len + i) sees keys <= it."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)
