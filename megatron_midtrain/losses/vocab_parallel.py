"""Target-token log-probabilities from a vocab-parallel logits shard.

Each TP rank holds logits for a contiguous slice of the vocabulary. We never
all-gather the full vocabulary and never keep an fp32 copy of the logits:

forward (per micro-batch)
  1. all-reduce(MAX) of the per-position shard max            -> m
  2. all-reduce(SUM) of one packed tensor [sum_exp, target_logit] per position
     (the target logit is non-zero only on the rank owning the target id)
  logp = target_logit - m - log(sum_exp)

backward recomputes ``softmax`` chunk by chunk from the (bf16/fp32) shard and
the saved per-position log-normaliser, so peak extra memory is one fp32 chunk:
  d logp / d logits = onehot(target) - softmax

This is two small all-reduces instead of megatron's three (max, target, sum).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

#: Positions per fp32 chunk; bounds the temporary to chunk * vocab_shard floats.
DEFAULT_CHUNK = 4096


def _shard_range(vocab_shard: int, group) -> tuple[int, int]:
    rank = dist.get_rank(group) if group is not None and dist.is_initialized() else 0
    return rank * vocab_shard, (rank + 1) * vocab_shard


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 logits; fp64 logits (the fp64 parity tests) stay fp64."""
    return torch.promote_types(dtype, torch.float32)


def _all_reduce(tensor, op, group):
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _VocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, chunk):
        flat = logits.reshape(-1, logits.shape[-1])
        tgt = target.reshape(-1)
        lo, hi = _shard_range(flat.shape[-1], group)
        n = flat.shape[0]
        ct = _compute_dtype(flat.dtype)
        shard_max = torch.empty(n, dtype=ct, device=flat.device)
        for s in range(0, n, chunk):
            shard_max[s : s + chunk] = flat[s : s + chunk].to(ct).amax(dim=-1)
        global_max = _all_reduce(shard_max, dist.ReduceOp.MAX, group)

        owned = (tgt >= lo) & (tgt < hi)
        local_idx = torch.where(owned, tgt - lo, torch.zeros_like(tgt))
        packed = torch.empty(n, 2, dtype=ct, device=flat.device)
        for s in range(0, n, chunk):
            block = flat[s : s + chunk].to(ct) - global_max[s : s + chunk, None]
            packed[s : s + chunk, 0] = block.exp().sum(dim=-1)
            tl = block.gather(-1, local_idx[s : s + chunk, None]).squeeze(-1)
            packed[s : s + chunk, 1] = torch.where(owned[s : s + chunk], tl, torch.zeros_like(tl))
        packed = _all_reduce(packed, dist.ReduceOp.SUM, group)
        log_norm = packed[:, 0].log()
        logp = packed[:, 1] - log_norm
        ctx.save_for_backward(logits, local_idx, owned, global_max + log_norm)
        ctx.chunk = chunk
        return logp.view(target.shape)

    @staticmethod
    def backward(ctx, grad_logp):
        logits, local_idx, owned, lse = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        ct = _compute_dtype(flat.dtype)
        g = grad_logp.reshape(-1).to(ct)
        grad = torch.empty_like(flat)
        for s in range(0, flat.shape[0], ctx.chunk):
            e = s + ctx.chunk
            probs = (flat[s:e].to(ct) - lse[s:e, None]).exp()
            block = -probs * g[s:e, None]
            # + g at the target column on the rank that owns it; a scatter (not boolean
            # indexing) keeps the backward free of host syncs (and runnable on ``meta``).
            gain = torch.where(owned[s:e], g[s:e], torch.zeros_like(g[s:e]))
            block.scatter_add_(1, local_idx[s:e, None], gain[:, None])
            grad[s:e] = block.to(grad.dtype)
        return grad.view_as(logits), None, None, None


def vocab_parallel_logprobs(logits: torch.Tensor, target: torch.Tensor, group=None, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """log p(target) from a vocab shard ``logits[..., V/tp]``; differentiable w.r.t. ``logits``.

    ``group`` is the tensor-parallel process group (None = the full vocabulary is local).
    Returns fp32 log-probs of shape ``target.shape`` (fp64 for fp64 logits).
    """
    return _VocabParallelLogProb.apply(logits, target, group, chunk)


def label_logprobs(batch: dict, logits: torch.Tensor) -> torch.Tensor:
    """Score function for :func:`~megatron_midtrain.training.forward.forward_only`: fp32 (fp64 for
    fp64 logits) ``log p(labels)`` ``[mbs, seq]`` of a micro-batch from its logits shard (TP group of megatron)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    logp = vocab_parallel_logprobs(logits, batch["labels"], group).detach()
    return logp.to(_compute_dtype(logp.dtype))
