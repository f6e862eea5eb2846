"""Rollout micro-batches (prompt + response rows) and the per-micro-batch inputs the RL losses read.

Rollout micro-batches of one step are right-padded to one length (megatron's pipeline
exchanges fixed-shape activations); padding is outside every mask.
"""

from __future__ import annotations

import torch


def rollout_micro_batches(prompts, responses, advantages, group_size: int, micro_batch_size: int, pad_id: int,
                          multiple: int = 8) -> list[dict]:
    """Prompt+response rows (row ``i`` is rollout ``i % G`` of prompt ``i // G``), right-padded.

    ``labels[t] = seq[t+1]``; the loss mask covers the labels that are response tokens.
    """
    rows = [list(prompts[i // group_size].ids) + list(r) for i, r in enumerate(responses)]
    longest = max(len(r) for r in rows) - 1
    length = max(multiple, -(-longest // multiple) * multiple)
    n = len(rows)
    seq = torch.full((n, length + 1), pad_id, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.float32)
    for i, row in enumerate(rows):
        seq[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        p = len(prompts[i // group_size].ids)
        mask[i, p - 1: len(row) - 1] = 1.0
    adv = torch.as_tensor(advantages, dtype=torch.float32)
    batches = []
    for s in range(0, n, micro_batch_size):
        e = s + micro_batch_size
        batches.append({
            "tokens": seq[s:e, :-1].contiguous(),
            "labels": seq[s:e, 1:].contiguous(),
            "loss_mask": mask[s:e],
            "position_ids": torch.arange(length).unsqueeze(0).expand(e - s, -1).contiguous(),
            "advantages": adv[s:e],
        })
    return batches


def attach_rollout_inputs(batches: list[dict], old: list, ref: list, agg_normalizer: float, drgrpo_constant: float) -> None:
    """Add what :class:`~megatron_midtrain.rl.losses.GRPOLoss` reads to each rollout micro-batch: the old
    (and reference) log-probs of the last stage (None: none), the global aggregation normaliser and
    Dr.GRPO's constant."""
    for b, o, r in zip(batches, old, ref):
        if o is not None:  # None: on-policy (one update), or not the last pipeline stage
            b["old_logprobs"] = o
        if r is not None:
            b["ref_logprobs"] = r
        b["agg_normalizer"] = torch.tensor(agg_normalizer, dtype=torch.float64)
        b["drgrpo_constant"] = drgrpo_constant


def attach_ntp_inputs(corpus: list[dict], rl_masks: list, ntp_normalizer: float) -> None:
    """Add Φ_RL and the global NTP token count to each corpus micro-batch (RMT's NTP term)."""
    for b, m in zip(corpus, rl_masks):
        b["rl_mask"] = m
        b["ntp_normalizer"] = torch.tensor(ntp_normalizer, dtype=torch.float64)
