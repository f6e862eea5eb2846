"""The RL methods' loss adapters for megatron's schedule (last pipeline stage).

An RL step runs the schedule over two kinds of micro-batches (see :mod:`megatron_midtrain.rl.trainer`):

* corpus micro-batches, for the NTP half of RMT's dual objective ``λ·L_NTP(S \\ Φ_RL)``
  (:class:`RLMethod.loss`, the registered method's ordinary loss);
* rollout micro-batches (prompt + response), for ``L_RL`` (:class:`GRPOLoss`).

Both return losses already divided by *global* normalisers (counted over every micro-batch
and data-parallel rank before the step), so the per-micro-batch sums add up to the global
objective; the trainer then all-reduces gradients over DP without a further division.
The maths is in the pure functions of :mod:`megatron_midtrain.rl.grpo`.
"""

from __future__ import annotations

import torch

from megatron_midtrain.losses.base import register_method, report_entry
from megatron_midtrain.losses.vocab_parallel import vocab_parallel_logprobs
from megatron_midtrain.rl.grpo import aggregation_units, grpo_policy_loss, ntp_loss_outside


class RLMethod:
    """Base of the registered RL methods: NTP over the corpus tokens outside Φ_RL."""

    needs_reference = None
    #: The trainer switches to the rollout loop (megatron_midtrain.rl.trainer.RLTrainer).
    is_rl = True

    def __init__(self, cfg, **context):
        self.cfg = cfg
        self.ntp_weight = float(getattr(cfg, "ntp_weight", 0.0))

    def loss(self, logits, labels, loss_mask, extras, tp_group):
        """``λ · Σ_{S∖Φ_RL} −log p / N`` with N the global count of those tokens (``extras``)."""
        logp = vocab_parallel_logprobs(logits, labels, tp_group)
        ntp, count = ntp_loss_outside(logp, loss_mask, extras["rl_mask"], normalizer=extras["ntp_normalizer"])
        nll_sum = ntp.detach() * extras["ntp_normalizer"]
        return self.ntp_weight * ntp, count.to(torch.int), {"rl/ntp_loss": report_entry(nll_sum, count)}

    def finalize_report(self, report):
        return report


@register_method("rmt")
class RMTMethod(RLMethod):
    """RMT (SPEC §3): entropy-curriculum GRPO on Φ_RL + λ·NTP on the rest."""


@register_method("grpo")
class GRPOMethod(RLMethod):
    """Verifiable-task GRPO (exact-match rewards); no NTP term."""

    def __init__(self, cfg, **context):
        super().__init__(cfg, **context)
        self.ntp_weight = 0.0


class GRPOLoss:
    """Clipped GRPO loss on one rollout micro-batch (``loss_mask`` = response mask)."""

    needs_reference = None

    def __init__(self, cfg):
        self.cfg = cfg

    def loss(self, logits, labels, loss_mask, extras, tp_group):
        cfg = self.cfg
        logp = vocab_parallel_logprobs(logits, labels, tp_group)
        loss, stats = grpo_policy_loss(
            logp, extras["old_logprobs"], extras["advantages"], loss_mask,
            eps_low=cfg.eps_low, eps_high=cfg.eps_high, ref_logprobs=extras.get("ref_logprobs"),
            beta=cfg.kl_beta, agg=cfg.loss_agg, drgrpo_constant=extras.get("drgrpo_constant"),
        )
        units = aggregation_units(loss_mask, cfg.loss_agg)
        scaled = loss * (units / extras["agg_normalizer"]).to(loss.dtype)
        n = stats["num_tokens"]
        report = {
            "rl/pg_loss": report_entry(stats["pg_loss"] * units, units),
            "rl/clip_frac": report_entry(stats["clip_frac"] * n, n),
            "rl/kl": report_entry(stats["kl_mean"] * n, n),
            "rl/ratio_mean": report_entry(stats["ratio_mean"] * n, n),
            "rl/rl_loss": report_entry(loss.detach() * units, units),
        }
        return scaled, loss_mask.sum().to(torch.int), report

    def finalize_report(self, report):
        return report


class LogprobCollector:
    """Forward-only: the per-token log-probs of the labels, as the micro-batch's report."""

    needs_reference = None

    def loss(self, logits, labels, loss_mask, extras, tp_group):
        logp = vocab_parallel_logprobs(logits, labels, tp_group).detach().float()
        return logits.sum() * 0.0, torch.zeros((), dtype=torch.int, device=logits.device), {"logprobs": logp}
