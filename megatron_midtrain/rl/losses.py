"""The clipped GRPO loss on one rollout micro-batch, as megatron's last stage calls it.

The loss is already divided by its *global* normaliser (aggregation units counted over every
micro-batch and data-parallel rank before the update), so per-micro-batch sums add up to the
global objective and the gradients are summed over DP without a further division. The maths
is in the pure functions of :mod:`megatron_midtrain.rl.grpo`.
"""

from __future__ import annotations

import torch

from megatron_midtrain.losses.base import report_entry
from megatron_midtrain.losses.vocab_parallel import vocab_parallel_logprobs
from megatron_midtrain.rl.grpo import aggregation_units, grpo_policy_loss


class GRPOLoss:
    """Clipped GRPO loss on one rollout micro-batch (``loss_mask`` = response mask)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def loss(self, logits, labels, loss_mask, extras, tp_group):
        cfg = self.cfg
        logp = vocab_parallel_logprobs(logits, labels, tp_group)
        loss, stats = grpo_policy_loss(
            logp, extras.get("old_logprobs"), extras["advantages"], loss_mask,
            eps_low=cfg.eps_low, eps_high=cfg.eps_high, ref_logprobs=extras.get("ref_logprobs"),
            beta=cfg.kl_beta, agg=cfg.loss_agg, drgrpo_constant=extras.get("drgrpo_constant"),
            clip_ratio_c=cfg.clip_ratio_c, kl_clamp=cfg.kl_clamp,
        )
        units = aggregation_units(loss_mask, cfg.loss_agg)
        scaled = loss * (units / extras["agg_normalizer"]).to(loss.dtype)
        n = stats["num_tokens"]
        report = {
            "rl/pg_loss": report_entry(stats["pg_loss"] * units, units),
            "rl/clip_frac": report_entry(stats["clip_frac"] * n, n),
            "rl/clip_frac_low": report_entry(stats["clip_frac_low"] * n, n),
            "rl/clip_frac_high": report_entry(stats["clip_frac_high"] * n, n),
            "rl/approx_kl_old": report_entry(stats["approx_kl_old"] * n, n),
            "rl/kl": report_entry(stats["kl_mean"] * n, n),
            "rl/ratio_mean": report_entry(stats["ratio_mean"] * n, n),
            "rl/rl_loss": report_entry(loss.detach() * units, units),
        }
        if cfg.clip_ratio_c:
            report["rl/clip_frac_dual"] = report_entry(stats["clip_frac_dual"] * n, n)
        return scaled, loss_mask.sum().to(torch.int), report

    def finalize_report(self, report):
        return report
