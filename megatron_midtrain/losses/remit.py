"""ReMiT token weights (Tan et al., arXiv 2602.03075, eq. 3-5 and Algorithm 1).

The pure weight function plus the ``method=remit`` adapter; the reference log-probs
arrive in ``extras["ref_logprobs"]`` (see reference/colocated.py).
"""

from __future__ import annotations

import math

import torch

from megatron_midtrain.losses.base import register_method, report_entry
from megatron_midtrain.losses.vocab_parallel import vocab_parallel_logprobs

CENTER_MODES = ("sequence", "document", "none")


def _group_mean(values: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the masked positions of each group id, broadcast back per position.

    ``groups`` holds non-negative ids below ``values.numel()``, unique across the whole batch.
    A group without any masked position gets mean 0 (its positions carry no loss anyway).
    """
    flat_groups = groups.reshape(-1)
    # numel() bounds the ids, so no ``max().item()`` host sync is needed on the GPU.
    num = flat_groups.numel()
    m = mask.reshape(-1).to(values.dtype)
    sums = torch.zeros(num, dtype=values.dtype, device=values.device).index_add_(0, flat_groups, values.reshape(-1) * m)
    counts = torch.zeros(num, dtype=values.dtype, device=values.device).index_add_(0, flat_groups, m)
    means = sums / counts.clamp(min=1.0)
    return means[flat_groups].view_as(values)


@torch.no_grad()
def remit_token_weights(
    policy_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    clip_eps: float = 0.2,
    center: str = "sequence",
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""ReMiT per-token loss weights, detached (no gradient flows through them).

    With :math:`\log p_\theta(x_t)` the policy's and :math:`\log p_{ref}(x_t)` the frozen
    reference's log-probability of the target token at position t:

    .. math::

        L_\Delta(x_t) &= -\log p_\theta(x_t \mid x_{<t}) + \log p_{ref}(x_t \mid x_{<t})      && (3) \\
        \hat L_\Delta(x_t) &= L_\Delta(x_t) - \mu_\Delta, \quad
            \mu_\Delta = \frac{1}{T}\sum_{t \in \text{mask}} L_\Delta(x_t)                     && (4) \\
        w_t &= \mathrm{clip}\big(2\,\sigma(\hat L_\Delta(x_t)),\ 1-\epsilon,\ 1+\epsilon\big)  && (5)

    and the ReMiT loss is :math:`\sum_t \text{mask}_t\, w_t\, (-\log p_\theta(x_t)) / \sum_t \text{mask}_t`.

    Args:
        policy_logprobs, ref_logprobs: ``[batch, seq]`` target-token log-probs.
        loss_mask: ``[batch, seq]``; 1/True where the token counts. The mean
            :math:`\mu_\Delta` is over these positions only (padding never shifts it).
        clip_eps: :math:`\epsilon`; 0 gives all-ones weights (plain NTP).
        center: ``sequence`` (paper, eq. 4: mean over each row's masked tokens),
            ``document`` (mean over each document; needs ``document_ids``) or ``none``.
        document_ids: ``[batch, seq]`` integer document index within each row
            (e.g. the cumulative count of EOD tokens), for ``center="document"``.

    Returns:
        ``[batch, seq]`` float32 weights; masked-out positions get weight 1.
        When the reference equals the policy every weight is exactly 1 (neutrality).
    """
    if center not in CENTER_MODES:
        raise ValueError(f"center={center!r} is not one of {CENTER_MODES}")
    if policy_logprobs.shape != ref_logprobs.shape or policy_logprobs.shape != loss_mask.shape:
        raise ValueError(
            f"shape mismatch: policy {tuple(policy_logprobs.shape)}, reference {tuple(ref_logprobs.shape)}, "
            f"mask {tuple(loss_mask.shape)}"
        )
    mask = loss_mask.bool()
    delta = (ref_logprobs.float() - policy_logprobs.float()).masked_fill(~mask, 0.0)
    if center == "sequence":
        rows = torch.arange(delta.shape[0], device=delta.device)[:, None].expand_as(delta)
        delta = delta - _group_mean(delta, mask, rows)
    elif center == "document":
        if document_ids is None:
            raise ValueError('center="document" needs document_ids')
        # Make ids unique across rows: row r's documents live in [r * span, (r + 1) * span).
        doc = document_ids.long()
        doc = doc - doc.min(dim=1, keepdim=True).values
        span = delta.shape[1]  # a row holds at most seq documents: ids stay below numel()
        rows = torch.arange(delta.shape[0], device=delta.device)[:, None]
        delta = delta - _group_mean(delta, mask, rows * span + doc)
    weights = (2.0 * torch.sigmoid(delta)).clamp(1.0 - clip_eps, 1.0 + clip_eps)
    return torch.where(mask, weights, torch.ones_like(weights))


def document_ids_from_tokens(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """Index of the document each position belongs to: the number of EODs strictly before it."""
    is_eod = (tokens == eod_id).long()
    return torch.cumsum(is_eod, dim=1) - is_eod


@register_method("remit")
class ReMiTMethod:
    """``L = sum(mask * w * -logp_theta) / sum(mask)`` with w from :func:`remit_token_weights`."""

    needs_reference = "target_logprobs"
    inputs = ("reference_logprobs",)

    def __init__(self, cfg, eod_id: int | None = None, **context):
        self.clip_eps = float(cfg.clip_eps)
        self.center = cfg.center
        self.eod_id = eod_id

    def loss(self, logits, labels, loss_mask, extras, tp_group):
        logp = vocab_parallel_logprobs(logits, labels, tp_group)
        ref = extras["ref_logprobs"]
        docs = document_ids_from_tokens(extras["tokens"], self.eod_id) if self.center == "document" else None
        weights = remit_token_weights(logp.detach(), ref, loss_mask, self.clip_eps, self.center, docs)
        mask = loss_mask.bool()
        loss_sum = -(logp * weights * mask).sum()
        count = mask.sum().to(torch.int)
        # Masked sums rather than boolean indexing: no host sync on the GPU.
        m = mask.double()
        w = weights.double()
        tol = 1e-6
        report = {
            "remit/w_mean": report_entry((w * m).sum(), count),
            "remit/w_sq_mean": report_entry((w * w * m).sum(), count),
            "remit/frac_low": report_entry(((w <= 1.0 - self.clip_eps + tol) & mask).sum(), count),
            "remit/frac_high": report_entry(((w >= 1.0 + self.clip_eps - tol) & mask).sum(), count),
            "remit/delta_mean": report_entry(((ref - logp.detach()) * mask).sum(), count),
            "ntp_loss": report_entry(-(logp.detach() * mask).sum(), count),
        }
        return loss_sum, count, report

    def finalize_report(self, report):
        out = dict(report)
        mean_sq = out.pop("remit/w_sq_mean", None)
        if mean_sq is not None and "remit/w_mean" in out:
            out["remit/w_std"] = math.sqrt(max(mean_sq - out["remit/w_mean"] ** 2, 0.0))
        return out
