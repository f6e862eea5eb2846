"""A new training method in one file: NTP on the tokens a frozen reference finds plausible.

``method=ref_filter method.min_prob=0.01 reference.checkpoint=RUN``: the loss is the mean NLL
over the tokens whose reference probability is at least ``min_prob`` (the others are dropped,
e.g. noise the reference rejects). docs/architecture.md walks through it line by line.
"""

from dataclasses import dataclass

import torch
from hydra.core.config_store import ConfigStore

from megatron_midtrain.config.schema import MethodConfig
from megatron_midtrain.losses.base import register_method, report_entry
from megatron_midtrain.losses.vocab_parallel import vocab_parallel_logprobs


@dataclass
class RefFilterMethodConfig(MethodConfig):
    name: str = "ref_filter"
    """NTP on the tokens whose reference probability is at least ``min_prob``."""
    min_prob: float = 0.01
    """Tokens the reference gives less probability than this are left out of the loss (0: none)."""


@register_method("ref_filter")
class RefFilterMethod:
    needs_reference = "target_logprobs"  # co-located or offline reference.checkpoint
    inputs = ("reference_logprobs",)  # -> extras["ref_logprobs"], [mbs, seq] on the last stage

    def __init__(self, cfg, **context):
        self.log_min = float(torch.tensor(cfg.min_prob).log())

    def loss(self, logits, labels, loss_mask, extras, tp_group):
        logp = vocab_parallel_logprobs(logits, labels, tp_group)  # never gathers the vocabulary
        keep = loss_mask * (extras["ref_logprobs"] >= self.log_min)
        kept = keep.sum()
        return -(logp * keep).sum(), kept.to(torch.int), {
            "ref_filter/kept_frac": report_entry(kept, loss_mask.sum()),
            "ntp_loss": report_entry(-(logp.detach() * loss_mask).sum(), loss_mask.sum()),
        }

    def finalize_report(self, report):
        return report


ConfigStore.instance().store(group="method", name="ref_filter", node=RefFilterMethodConfig)
