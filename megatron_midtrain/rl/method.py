"""The registered RL methods (``rmt``, ``grpo``): their step is the rollout step.

An RL step (:class:`megatron_midtrain.rl.step.RolloutStep`) runs the schedule over two kinds
of micro-batches:

* corpus micro-batches, for the NTP half of RMT's dual objective ``λ·L_NTP(S \\ Φ_RL)``
  (:meth:`RLMethod.loss`, the registered method's ordinary loss);
* rollout micro-batches (prompt + response), for ``L_RL`` (:class:`megatron_midtrain.rl.losses.GRPOLoss`).

Both return losses already divided by *global* normalisers (counted over every micro-batch
and data-parallel rank before the step), so the per-micro-batch sums add up to the global
objective; the gradients are then summed over DP without a further division.
"""

from __future__ import annotations

import torch

from megatron_midtrain.errors import UserError
from megatron_midtrain.losses.base import register_method, report_entry
from megatron_midtrain.losses.vocab_parallel import vocab_parallel_logprobs
from megatron_midtrain.rl.grpo import ntp_loss_outside


class RLMethod:
    """Base of the registered RL methods: NTP over the corpus tokens outside Φ_RL."""

    needs_reference = None
    #: Marks the methods whose step generates rollouts (tests and tools ask).
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

    def check_inputs(self, cfg, layout, sources, tokenizer_id) -> None:
        """Layout and side-data checks, before the run directory is written."""
        from megatron_midtrain.rl.entropy import check_entropy_alignment
        from megatron_midtrain.rl.tasks import read_problems

        rl, dp = cfg.method, layout.dp
        if rl.prompts_per_step % dp:
            raise UserError(f"method.prompts_per_step={rl.prompts_per_step} is not divisible by DP={dp}",
                            "use a multiple of the data-parallel size")
        rows = rl.prompts_per_step // dp * rl.group_size
        if rows % rl.rollout_micro_batch_size:
            raise UserError(f"{rows} rollouts per DP rank (prompts_per_step/DP x group_size) are not divisible by "
                            f"method.rollout_micro_batch_size={rl.rollout_micro_batch_size}", "pick a divisor")
        K, prompts = rl.ppo_mini_batches, rl.prompts_per_step // dp
        if prompts % K or (prompts // K * rl.group_size) % rl.rollout_micro_batch_size:
            raise UserError(f"{prompts} prompts per DP rank do not split into method.ppo_mini_batches={K} mini-batches of whole "
                            f"rollout micro-batches (method.rollout_micro_batch_size={rl.rollout_micro_batch_size})",
                            "make prompts_per_step/DP a multiple of ppo_mini_batches, and prompts/ppo_mini_batches x "
                            "group_size a multiple of rollout_micro_batch_size")
        corpus = cfg.train.global_batch_tokens // cfg.data.seq_length // (cfg.train.micro_batch_size * dp)
        if rl.name == "rmt" and corpus % K:
            raise UserError(f"the {corpus} corpus micro-batches per DP rank (RMT's NTP term) do not split into "
                            f"method.ppo_mini_batches={K} mini-batches",
                            "make the global batch / (train.micro_batch_size x DP) a multiple of ppo_mini_batches")
        if rl.name == "rmt":
            _, prefixes, _ = sources
            if len(rl.entropy_dirs) != len(prefixes):
                raise UserError(f"method.entropy_dirs has {len(rl.entropy_dirs)} entries for {len(prefixes)} datasets",
                                "give one entropy index (tools/preprocess_entropy.py --output DIR) per data path, in order")
            for d, prefix in zip(rl.entropy_dirs, prefixes):
                check_entropy_alignment(d, prefix, tokenizer_id)
        else:
            for path, what in ((rl.task_file, "method.task_file"), (rl.eval_file, "method.eval_file")):
                if path:
                    read_problems(path, what)

    def make_step(self, trainer):
        """The rollout -> reward -> advantage -> update step."""
        from megatron_midtrain.rl.step import RolloutStep

        return RolloutStep(trainer, self)

    def callbacks(self, cfg) -> list:
        """GRPO on verifiable problems reports greedy held-out accuracy."""
        if cfg.method.name == "grpo" and cfg.method.eval_problems > 0:
            from megatron_midtrain.callbacks.heldout_accuracy import HeldOutAccuracy

            return [HeldOutAccuracy(cfg.train.eval_interval, cfg.train.max_steps)]
        return []


@register_method("rmt")
class RMTMethod(RLMethod):
    """RMT (SPEC §3): entropy-curriculum GRPO on Φ_RL + λ·NTP on the rest."""


@register_method("grpo")
class GRPOMethod(RLMethod):
    """Verifiable-task GRPO (exact-match rewards); no NTP term."""

    def __init__(self, cfg, **context):
        super().__init__(cfg, **context)
        self.ntp_weight = 0.0
