"""ReMiT token weights (Tan et al., arXiv 2602.03075, eq. 3-5 and Algorithm 1).

This module holds the pure weight function. The ``method=remit`` loss, which needs
the co-located or offline reference, is not wired into the trainer yet (issue 3).
"""

from __future__ import annotations

import torch

CENTER_MODES = ("sequence", "document", "none")


def _group_mean(values: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the masked positions of each group id, broadcast back per position.

    ``groups`` holds non-negative ids, unique across the whole batch. A group without any
    masked position gets mean 0 (its positions carry no loss anyway).
    """
    flat_groups = groups.reshape(-1)
    num = int(flat_groups.max().item()) + 1 if flat_groups.numel() else 0
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
        span = int(doc.max().item()) + 1 if doc.numel() else 1
        rows = torch.arange(delta.shape[0], device=delta.device)[:, None]
        delta = delta - _group_mean(delta, mask, rows * span + doc)
    weights = (2.0 * torch.sigmoid(delta)).clamp(1.0 - clip_eps, 1.0 + clip_eps)
    return torch.where(mask, weights, torch.ones_like(weights))
