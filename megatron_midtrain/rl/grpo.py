r"""GRPO for RMT (SPEC §3 "GRPO", "Dual objective") as pure tensor functions.

Shapes: ``N`` responses (``num_groups * G``, groups contiguous: rows ``[g*G, (g+1)*G)`` are the
G rollouts of prompt g), ``L`` response positions. ``response_mask`` ``[N, L]`` marks the
generated tokens that count (not prompt, not padding).

Advantage (per response, broadcast over its tokens)
    :math:`A_i = (r_i - \mathrm{mean}_G r) / (\mathrm{std}_G r + \delta)`; ``no_std=True``
    (Dr.GRPO) gives :math:`A_i = r_i - \mathrm{mean}_G r`. std is the unbiased (Bessel) group
    std as in TRL and verl; δ = 1e-6.

Token loss
    :math:`\rho_t = \exp(\log\pi_\theta(y_t) - \log\pi_{old}(y_t))`,

    :math:`\ell_t = -\min(\rho_t A,\ \mathrm{clip}(\rho_t, 1-\epsilon_{lo}, 1+\epsilon_{hi}) A) + \beta\, k3_t`,

    :math:`k3_t = \exp(\log\pi_{ref} - \log\pi_\theta) - (\log\pi_{ref} - \log\pi_\theta) - 1`
    (Schulman's k3 estimator of KL(π_θ‖π_ref), ≥ 0; β defaults to 0 and then the reference is
    not needed). As verl's ``low_var_kl``, the log-ratio is clamped to [-20, 20] and k3 itself to
    [-10, 10] (:data:`K3_CLAMP`): far from the reference the estimate and its gradient stay
    bounded (≤ 10 and e^{log 10}) instead of reaching e^20; the clamp is inactive while the
    policy is within a log-ratio of about 2.6 of the reference.

    Dual-clip (``clip_ratio_c = c > 1``, off by default; verl's ``clip_ratio_c``): for A < 0 the
    token loss is additionally capped, :math:`\ell_t = \min(\ell_t, -cA)`, so a ratio far above
    1 + ε cannot drive a negative-advantage token's loss without bound.

    On-policy (``old_logprobs=None``): one update per rollout batch, π_old = π_θ, so the ratio is
    1 by construction and the loss uses the detached current log-probs (no recompute pass).

Aggregation (``agg``), with :math:`m` the response mask:
    * ``token-mean`` (default): :math:`\sum_{i,t} m\ell / \sum_{i,t} m`.
    * ``seq-mean-token-mean``: :math:`\frac{1}{N'}\sum_i \big(\sum_t m\ell / \sum_t m\big)` over the
      :math:`N'` responses with at least one token.
    * ``seq-mean-token-sum-norm`` (alias ``drgrpo``; Dr.GRPO): :math:`\sum_{i,t} m\ell / (N \cdot C)`
      with the constant C = ``drgrpo_constant`` (default: the padded response length L, i.e. the
      generation max length), as verl's ``seq-mean-token-sum-norm``.
"""

from __future__ import annotations

import torch

from megatron_midtrain.config.rl_rules import AGG_MODES, canonical_agg  # noqa: F401  (AGG_MODES: re-export)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half/bf16 inputs; fp64 stays fp64."""
    return x if x.dtype == torch.float64 else x.float()


def grpo_advantages(rewards: torch.Tensor, group_size: int, no_std: bool = False, eps: float = 1e-6) -> torch.Tensor:
    r"""Group-normalised advantages.

    ``A_i = (r_i - mean_G r) / (std_G r + eps)``, or ``r_i - mean_G r`` with ``no_std`` (Dr.GRPO).

    Args:
        rewards: ``[N]`` with N divisible by ``group_size`` (groups contiguous), or ``[num_groups, G]``.
        group_size: G.
        no_std: drop the std division (Dr.GRPO).
        eps: δ in the denominator.

    Returns:
        float32 advantages with the shape of ``rewards``. A group of identical rewards gets 0;
        G = 1 gives 0 (no group baseline to compare to).
    """
    r = rewards.detach().to(torch.float64)
    shape = r.shape
    if group_size <= 0 or r.numel() % group_size != 0:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    g = r.reshape(-1, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if not no_std:
        std = g.std(dim=1, unbiased=True, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(shape).to(torch.float32)


#: k3 is clamped to [-K3_CLAMP, K3_CLAMP] (verl's low_var_kl clamps its estimate to [-10, 10]).
K3_CLAMP = 10.0


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, clamp: float = K3_CLAMP) -> torch.Tensor:
    r"""Per-token k3 estimator :math:`e^{\log\pi_{ref}-\log\pi_\theta} - (\log\pi_{ref}-\log\pi_\theta) - 1`.

    The log-ratio is clamped to [-20, 20] before ``exp`` and the estimate to [-10, 10]
    (``clamp``, default :data:`K3_CLAMP`; 0 = no clamp), as verl's ``low_var_kl``; where the
    clamp acts the gradient is 0.
    """
    d = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    k3 = torch.exp(d) - d - 1.0
    return k3.clamp(-clamp, clamp) if clamp else k3


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean", drgrpo_constant: float | None = None) -> torch.Tensor:
    """Aggregate a ``[N, L]`` per-token loss under ``mask`` (formulas in the module docstring)."""
    agg = canonical_agg(agg)
    m = mask.to(values.dtype)
    masked = values * m
    if agg == "token-mean":
        return masked.sum() / m.sum().clamp(min=1.0)
    if agg == "seq-mean-token-mean":
        per_tok = m.sum(dim=-1)
        seq = masked.sum(dim=-1) / per_tok.clamp(min=1.0)
        has = (per_tok > 0).to(values.dtype)
        return (seq * has).sum() / has.sum().clamp(min=1.0)
    const = float(drgrpo_constant) if drgrpo_constant is not None else float(values.shape[-1])
    if const <= 0:
        raise ValueError(f"drgrpo_constant must be positive, got {drgrpo_constant}")
    return masked.sum() / (values.shape[0] * const)


def grpo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    agg: str = "token-mean",
    drgrpo_constant: float | None = None,
    clip_ratio_c: float = 0.0,
    kl_clamp: float = K3_CLAMP,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Clipped-ratio GRPO loss with optional k3 KL (formulas in the module docstring).

    Args:
        logprobs: ``[N, L]`` current-policy log-probs of the generated tokens (with grad).
        old_logprobs: ``[N, L]`` log-probs under the rollout policy, recorded before the first
            update of the rollout batch (detached here); None: on-policy (the detached current
            log-probs, ratio 1).
        advantages: ``[N]`` (per response) or ``[N, L]`` (per token); detached here.
        response_mask: ``[N, L]``; truthy for tokens that count.
        eps_low, eps_high: ε_lo / ε_hi of ``clip(ρ, 1-ε_lo, 1+ε_hi)`` (DAPO's clip-higher when
            ``eps_high > eps_low``).
        ref_logprobs: ``[N, L]`` reference log-probs; required when ``beta > 0``. When given, the
            KL is reported even with β = 0.
        beta: KL weight β (default 0).
        agg: ``token-mean`` | ``seq-mean-token-mean`` | ``seq-mean-token-sum-norm`` (``drgrpo``).
        drgrpo_constant: C for Dr.GRPO (default L).
        clip_ratio_c: dual-clip constant c (> 1; 0 = off).
        kl_clamp: bound of the per-token k3 estimate (0 = unbounded).

    Returns:
        ``(loss, extras)``; ``loss`` is a scalar with grad. ``extras`` holds detached float
        scalars, all means over masked tokens: ``pg_loss`` (aggregated policy-gradient part),
        ``kl_loss`` (aggregated k3, 0 without a reference), ``kl_mean``, ``clip_frac`` (share of
        tokens where the clipped term is the active one, as verl's ``pg_clipfrac``),
        ``clip_frac_low`` (ρ < 1-ε_lo with A < 0), ``clip_frac_high`` (ρ > 1+ε_hi with A > 0),
        ``clip_frac_dual`` (A < 0 tokens where the dual-clip cap is active), ``ratio_mean``,
        ``ratio_max``, ``approx_kl_old`` (mean of log π_old − log π_θ), ``num_tokens``.
    """
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    if logprobs.shape != old_logprobs.shape or logprobs.shape != response_mask.shape:
        raise ValueError(
            f"shape mismatch: logprobs {tuple(logprobs.shape)}, old {tuple(old_logprobs.shape)}, mask {tuple(response_mask.shape)}"
        )
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")
    mask = response_mask.bool()
    lp = _upcast(logprobs)
    old = _upcast(old_logprobs.detach())
    adv = advantages.detach().to(lp.dtype)
    if adv.dim() == 1:
        adv = adv[:, None]
    adv = adv.expand_as(lp)

    log_ratio = lp - old
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    pg_unclipped = -ratio * adv
    pg_clipped = -clipped * adv
    pg_tok = torch.maximum(pg_unclipped, pg_clipped)  # == -min(ρA, clip(ρ)A)
    dual = torch.zeros_like(mask)
    if clip_ratio_c:
        cap = -clip_ratio_c * adv
        dual = (adv < 0) & (cap < pg_tok)
        pg_tok = torch.where(adv < 0, torch.minimum(pg_tok, cap), pg_tok)
    pg_loss = aggregate(pg_tok, mask, agg, drgrpo_constant)

    loss = pg_loss
    kl_tok = None
    if ref_logprobs is not None:
        kl_tok = k3_kl(lp, ref_logprobs.detach().to(lp.dtype), kl_clamp)
        kl_loss = aggregate(kl_tok, mask, agg, drgrpo_constant)
        if beta > 0:
            loss = loss + beta * kl_loss
    else:
        kl_loss = torch.zeros((), dtype=lp.dtype, device=lp.device)

    with torch.no_grad():
        mf = mask.float()
        n = mf.sum().clamp(min=1.0)

        def mmean(x):
            return (x.float() * mf).sum() / n

        extras = {
            "pg_loss": pg_loss.detach(),
            "kl_loss": kl_loss.detach(),
            "kl_mean": mmean(kl_tok) if kl_tok is not None else torch.zeros((), device=lp.device),
            "clip_frac": mmean(pg_clipped > pg_unclipped),
            "clip_frac_low": mmean((ratio < 1.0 - eps_low) & (adv < 0)),
            "clip_frac_high": mmean((ratio > 1.0 + eps_high) & (adv > 0)),
            "clip_frac_dual": mmean(dual),
            "ratio_mean": mmean(ratio),
            # 1 with no token; a masked max keeps this free of host syncs
            "ratio_max": torch.where(mask.any(), torch.where(mask, ratio, torch.zeros_like(ratio)).max(),
                                     torch.ones((), dtype=ratio.dtype, device=ratio.device)),
            "approx_kl_old": mmean(-log_ratio),
            "num_tokens": mf.sum(),
        }
    return loss, extras


def ntp_loss_outside(
    logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    rl_mask: torch.Tensor,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Masked NTP over :math:`S \setminus \Phi_{RL}`: ``Σ m'·(−logp) / Σ m'`` with ``m' = loss_mask ∧ ¬rl_mask``.

    Args:
        logprobs: ``[B, S]`` policy log-probs of the corpus target tokens.
        loss_mask: ``[B, S]`` the ordinary NTP loss mask (the set S).
        rl_mask: ``[B, S]`` truthy at positions in Φ_RL (their target token is learned by RL).
        normalizer: divide by this instead of ``Σ m'`` (e.g. a global token count so that
            micro-batches/ranks combine exactly).

    Returns:
        ``(loss, count)``; ``count = Σ m'``. With no token left the loss is 0.
    """
    m = loss_mask.bool() & ~rl_mask.bool()
    count = m.sum()
    total = -(_upcast(logprobs) * m).sum()
    denom = torch.as_tensor(normalizer, dtype=total.dtype, device=total.device) if normalizer is not None else count.to(total.dtype).clamp(min=1.0)
    return total / denom, count


def dual_objective(
    rl_loss: torch.Tensor,
    logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    rl_mask: torch.Tensor,
    lam: float = 0.1,
    ntp_normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""RMT dual objective :math:`\mathcal{L} = \mathcal{L}_{RL}(\Phi_{RL}) + \lambda\,\mathcal{L}_{NTP}(S \setminus \Phi_{RL})`.

    ``rl_loss`` is the aggregated GRPO loss (:func:`grpo_policy_loss`); the NTP term is
    :func:`ntp_loss_outside` over the corpus tokens not in Φ_RL. λ defaults to 0.1.

    Returns ``(loss, extras)`` with detached ``rl_loss``, ``ntp_loss`` and ``ntp_tokens``.
    """
    ntp, count = ntp_loss_outside(logprobs, loss_mask, rl_mask, ntp_normalizer)
    loss = rl_loss + lam * ntp
    return loss, {"rl_loss": rl_loss.detach(), "ntp_loss": ntp.detach(), "ntp_tokens": count.detach()}


def aggregation_units(mask: torch.Tensor, agg: str = "token-mean") -> torch.Tensor:
    """The denominator units of :func:`aggregate` in ``mask`` (float scalar): masked tokens
    (token-mean), responses with at least one token (seq-mean-token-mean) or rows (Dr.GRPO).

    A loss aggregated per micro-batch times ``units(micro-batch) / units(global batch)`` sums
    over micro-batches and data-parallel ranks to the loss aggregated over the global batch
    (for Dr.GRPO with the same constant C), which is how the trainer splits one GRPO step.
    """
    agg = canonical_agg(agg)
    m = mask.bool()
    if agg == "token-mean":
        return m.sum().to(torch.float64)
    if agg == "seq-mean-token-mean":
        return (m.sum(dim=-1) > 0).sum().to(torch.float64)
    return torch.tensor(float(m.shape[0]), dtype=torch.float64, device=m.device)
