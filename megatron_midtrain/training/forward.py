"""The one way a model runs: megatron's pipeline schedule over micro-batch dicts.

:func:`run_schedule` drives megatron-core's forward/backward schedule (any TP/PP layout) over
micro-batches that carry ``tokens``, ``position_ids`` (and optionally ``attention_mask``) plus
whatever the loss reads; it moves each micro-batch to the device (the one place where data
meets the model's device) and calls ``loss_fn(batch, logits) -> (loss_sum, num_tokens, report)``
on the last pipeline stage. Gradients are *not* finalised here: the caller decides how they
are reduced (:func:`finalize_gradients`), since an RL step adds two schedules into one buffer.

:func:`forward_only` is the forward-only special case that every scorer uses (the frozen
reference, offline scoring, validation, the RHO-1 prepass, RL old/reference log-probs, the
evaluation scorer, the checkpoint log-prob tools): ``score_fn(batch, logits)`` returns any
tensor (or tuple of tensors) per micro-batch, collected on the last stage and optionally
broadcast to every pipeline stage.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_midtrain.training.data import to_device

LossFn = Callable[[dict, torch.Tensor], tuple]
ScoreFn = Callable[[dict, torch.Tensor], object]


def _forward_step(device, loss_fn, data_iterator, model):
    batch = to_device(next(data_iterator), device)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
    return output, partial(loss_fn, batch)


def run_schedule(model, micro_batches: Iterable[dict], num_microbatches: int, loss_fn: LossFn, *, seq_length: int,
                 micro_batch_size: int, device: torch.device, forward_only: bool = False,
                 collect_non_loss_data: bool = False) -> list:
    """One pass of megatron's schedule; returns the last stage's per-micro-batch reports ([] elsewhere).

    ``model``: a GPTModel stage or its DDP wrapper (one chunk). ``loss_fn(batch, output)`` runs on the
    last stage only; with ``collect_non_loss_data`` it is called as ``loss_fn(batch, output,
    non_loss_data=True)`` and its return value is collected as is.
    """
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, device, loss_fn),
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        decoder_seq_length=seq_length,
        forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data,
    )


def method_loss_fn(method, tp_group) -> LossFn:
    """``loss_fn`` for :func:`run_schedule` from a method (or loss adapter): ``method.loss`` on the
    micro-batch (whose dict is the loss's ``extras``), with the ``loss`` report entry ``[sum, tokens]``."""

    def loss_fn(batch, logits):
        loss_sum, num_tokens, report = method.loss(logits, batch["labels"], batch["loss_mask"], batch, tp_group)
        return loss_sum, num_tokens, dict(report, loss=torch.stack([loss_sum.detach().double(), num_tokens.double()]))

    return loss_fn


def _score_only(score_fn: ScoreFn, batch, output, non_loss_data=True):  # noqa: ARG001
    return score_fn(batch, output)


@torch.no_grad()
def forward_only(model, micro_batches: Iterable[dict], num_microbatches: int, score_fn: ScoreFn, *, seq_length: int,
                 micro_batch_size: int, device: torch.device, broadcast: bool = False) -> list:
    """``score_fn(batch, logits)`` of every micro-batch, forward only, under any TP/PP layout.

    Returns the scores on the last pipeline stage and ``[None] * num_microbatches`` on the others,
    unless ``broadcast``: then every stage gets the last stage's scores (each a tensor or a tuple
    of tensors; shapes are sent along, so they may differ between micro-batches).
    """
    out = run_schedule(model, micro_batches, num_microbatches, partial(_score_only, score_fn), seq_length=seq_length,
                       micro_batch_size=micro_batch_size, device=device, forward_only=True, collect_non_loss_data=True)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    if not last:
        out = [None] * num_microbatches
    if broadcast and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        box = [[_to_cpu(o) for o in out] if last else None]
        dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                   group=parallel_state.get_pipeline_model_parallel_group())
        if not last:
            out = [_to(o, device) for o in box[0]]
    return list(out)


def next_token_batch(tokens: torch.Tensor) -> dict:
    """A forward-only micro-batch of ``[b, s]`` token ids: positions ``0..s-1`` and, as the target
    of position ``p``, token ``p + 1`` (the last position's target wraps around: ignore it)."""
    return {"tokens": tokens, "position_ids": torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens),
            "targets": torch.roll(tokens, shifts=-1, dims=1)}


def _to_cpu(value):
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    return value.cpu() if torch.is_tensor(value) else value


def _to(value, device):
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value.to(device) if torch.is_tensor(value) else value


def finalize_gradients(model, num_tokens: torch.Tensor | None) -> None:
    """Reduce the gradients of one step over DP (and the embedding/norm groups), dividing by the
    global token count ``num_tokens`` (None: the losses are already globally normalised)."""
    finalize_model_grads([model], num_tokens=num_tokens)


def reduce_reports(reports: list, dp_size: int, pp_size: int) -> dict[str, float]:
    """Sum ``{name: [sum, count]}`` reports over micro-batches and DP ranks; ``{name: sum/count}`` on every rank."""
    summed = None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        keys = sorted(reports[0]) if reports else []
        summed = torch.stack([sum(r[k] for r in reports) for k in keys]) if keys else torch.zeros(0, 2, dtype=torch.float64)
        if dp_size > 1:
            dist.all_reduce(summed, group=parallel_state.get_data_parallel_group())
        summed = {k: summed[i].cpu() for i, k in enumerate(keys)}
    if pp_size > 1:
        box = [summed]
        dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                   group=parallel_state.get_pipeline_model_parallel_group())
        summed = box[0]
    return {k: (v[0] / v[1]).item() if v[1] > 0 else float("nan") for k, v in summed.items()}
