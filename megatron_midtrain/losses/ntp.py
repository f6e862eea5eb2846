"""Vanilla next-token prediction: L = sum(mask * -logp) / sum(mask) over the global batch."""

from __future__ import annotations

import torch

from megatron_midtrain.losses.base import register_method, report_entry
from megatron_midtrain.losses.vocab_parallel import vocab_parallel_logprobs


def ntp_loss_sum(logprobs: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure function: (sum of masked negative log-likelihood, number of masked tokens)."""
    mask = loss_mask.to(logprobs.dtype)
    return -(logprobs * mask).sum(), loss_mask.sum().to(torch.int)


@register_method("ntp")
class NTPMethod:
    """Plain next-token prediction: the mean token NLL."""

    needs_reference = None
    inputs = ()

    def __init__(self, cfg=None, **context):
        self.cfg = cfg

    def loss(self, logits, labels, loss_mask, extras, tp_group):
        logp = vocab_parallel_logprobs(logits, labels, tp_group)
        loss_sum, count = ntp_loss_sum(logp, loss_mask)
        return loss_sum, count, {"ntp_loss": report_entry(loss_sum, count)}

    def finalize_report(self, report):
        return report
