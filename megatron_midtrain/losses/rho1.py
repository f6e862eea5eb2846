"""RHO-1 baseline (selective language modelling): NTP on the tokens with the largest excess loss.

Excess loss ``S(t) = -log p_theta(t) + log p_ref(t)``; keep the top ``keep_ratio`` of the
masked tokens by ``S`` and take the mean NTP loss over the kept ones.

Selection scope:
* ``global`` (default, SPEC): the threshold is the k-th largest ``S`` over the whole global
  batch (all micro-batches and DP ranks). The trainer runs a forward-only policy pass first
  (:meth:`Rho1Method.score`), calls :meth:`Rho1Method.select` to turn the scores into
  per-micro-batch keep masks, and the training pass uses them. Costs one extra forward.
* ``microbatch``: the threshold is taken within each micro-batch; no extra pass.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_midtrain.losses.base import register_method, report_entry
from megatron_midtrain.losses.vocab_parallel import vocab_parallel_logprobs


def excess_loss(policy_logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Pure function: S = -log p_theta + log p_ref (per token)."""
    return -policy_logprobs + ref_logprobs


def topk_threshold(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Smallest score among the top ``ceil(keep_ratio * n)`` values (``+inf`` when nothing is kept)."""
    n = scores.numel()
    k = min(n, math.ceil(keep_ratio * n))
    if k == 0:
        return torch.tensor(float("inf"), dtype=scores.dtype, device=scores.device)
    return torch.topk(scores, k).values[-1]


def masked_topk_threshold(scores: torch.Tensor, mask: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """:func:`topk_threshold` of ``scores[mask]`` without boolean indexing or ``.item()``
    (no host sync on the GPU): the ``ceil(keep_ratio * n)``-th largest masked score."""
    filled = torch.where(mask, scores, torch.full_like(scores, float("-inf"))).reshape(-1)
    n = mask.sum()
    k = torch.ceil(n.to(torch.float64) * keep_ratio).to(torch.long).clamp(max=n)
    ordered = torch.sort(filled, descending=True).values
    kth = ordered.gather(0, (k - 1).clamp(min=0).reshape(1)).reshape(())
    return torch.where(k > 0, kth, torch.full_like(kth, float("inf")))


def _gather_masked(values: torch.Tensor, group) -> torch.Tensor:
    """All masked-token scores of the data-parallel group (variable length per rank)."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return values
    size = torch.tensor([values.numel()], dtype=torch.long, device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.full((longest,), float("-inf"), dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    chunks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded, group=group)
    return torch.cat([c[: int(s.item())] for c, s in zip(chunks, sizes)])


@register_method("rho1")
class Rho1Method:
    needs_reference = "target_logprobs"

    def __init__(self, cfg, **context):
        self.keep_ratio = float(cfg.keep_ratio)
        self.scope = cfg.scope
        # Global scope: a forward-only policy pass scores the whole global batch first.
        self.inputs = ("reference_logprobs", "policy_prepass") if self.scope == "global" else ("reference_logprobs",)

    # --- global scope: scores from a forward-only pass, then one threshold for the global batch
    @torch.no_grad()
    def score(self, logits, labels, loss_mask, extras, tp_group) -> torch.Tensor:
        logp = vocab_parallel_logprobs(logits, labels, tp_group)
        return excess_loss(logp, extras["ref_logprobs"])

    @torch.no_grad()
    def select(self, scores: list, loss_masks: list, dp_group) -> list[dict]:
        masked = torch.cat([s[m.bool().to(s.device)] for s, m in zip(scores, loss_masks)])
        threshold = topk_threshold(_gather_masked(masked.float(), dp_group), self.keep_ratio)
        return [{"rho1_keep": (s >= threshold) & m.bool().to(s.device)} for s, m in zip(scores, loss_masks)]

    def loss(self, logits, labels, loss_mask, extras, tp_group):
        logp = vocab_parallel_logprobs(logits, labels, tp_group)
        mask = loss_mask.bool()
        if self.scope == "global":
            keep = extras["rho1_keep"]
        else:
            s = excess_loss(logp.detach(), extras["ref_logprobs"])
            keep = (s >= masked_topk_threshold(s, mask, self.keep_ratio)) & mask
        kept = keep.sum().to(torch.int)
        loss_sum = -(logp * keep).sum()
        total = mask.sum().to(torch.int)
        return loss_sum, kept, {
            "rho1/kept_frac": report_entry(keep.sum().double(), total),
            "ntp_loss": report_entry(-(logp.detach() * mask).sum(), total),
        }

    def finalize_report(self, report):
        return report
