"""Every parameter's gradient as one full (unsharded) tensor, for layout-parity tests.

A loss that agrees across layouts can hide a wrong shard (a norm weight whose gradient is
summed over the wrong group, a replica that is never reduced): the aggregate is dominated by
the embedding. Parity is therefore checked per parameter, per layer.

The placement of each local tensor inside its global tensor is read from megatron's own
``sharded_state_dict()`` (the metadata that checkpoint resharding and our initialisation use),
so TP shards, the fused SwiGLU ``linear_fc1`` halves, pipeline layer offsets and the tied output
layer are assembled exactly as a checkpoint would be. Gradients are read by pointing every
parameter's ``.data`` at its ``main_grad`` for the duration of the walk.

Every replica of a box (DP copies, TP-replicated norms, the tied head on the last stage) is
collected too: replicas that disagree are a bug of their own (a gradient that was never
reduced), reported as :attr:`FullGradients.replica_spread`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@contextmanager
def _params_hold_grads(modules):
    """Temporarily make each parameter's ``.data`` its accumulated gradient (``main_grad``)."""
    saved = []
    try:
        for module in modules:
            for p in module.parameters():
                grad = getattr(p, "main_grad", None)
                if grad is None:
                    grad = p.grad if p.grad is not None else torch.zeros_like(p)
                saved.append((p, p.data))
                p.data = grad.view_as(p).to(p.dtype)
        yield
    finally:
        for p, data in saved:
            p.data = data


def _local_boxes(modules) -> list[tuple[str, int, tuple, tuple, torch.Tensor]]:
    """``(key, layer axes, global shape, global offset, local tensor)`` of every sharded
    tensor on this rank (the leading ``layer axes`` index stacked layers)."""
    from megatron_midtrain.model.init import sharded_tensors

    boxes = []
    for module in modules:
        for sh in sharded_tensors(module.sharded_state_dict()):
            if sh.data is None or not sh.data.is_floating_point():
                continue
            data = sh.data.detach().reshape(tuple(sh.local_shape))
            # fp32 (fp64 stays fp64: the fp64 parity cells)
            local = data.to(torch.promote_types(data.dtype, torch.float32)).cpu().clone()
            boxes.append((sh.key, sh.prepend_axis_num, tuple(sh.global_shape), tuple(sh.global_offset), local))
    return boxes


@dataclass
class FullGradients:
    """Rank 0's view: ``tensors[(key, layer)]`` is the full gradient (``layer`` None off-layer)."""

    tensors: dict = field(default_factory=dict)
    #: (key, layer) -> largest |difference| between two replicas of the same box.
    replica_spread: dict = field(default_factory=dict)


def full_gradients(model_chunks, params: bool = False) -> FullGradients | None:
    """Collective over the whole world: gather every parameter's gradient (or, with ``params``,
    its value) to full tensors on global rank 0; other ranks return None.

    ``model_chunks``: the DDP-wrapped (or bare) GPTModel stages of this rank.
    """
    modules = [getattr(m, "module", m) for m in model_chunks]
    if params:
        boxes = _local_boxes(modules)
    else:
        with _params_hold_grads(modules):
            boxes = _local_boxes(modules)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        gathered = [None] * world if dist.get_rank() == 0 else None
        dist.gather_object(boxes, gathered, dst=0)
        if dist.get_rank() != 0:
            return None
    else:
        gathered = [boxes]
    out = FullGradients()
    first: dict = {}  # (key, layer, offset) -> the first replica seen
    for rank_boxes in gathered:
        for key, axes, shape, offset, local in rank_boxes:
            layer = offset[0] if axes else None  # one layer axis (no virtual pipeline stages)
            target = out.tensors.setdefault((key, layer), torch.zeros(shape[axes:], dtype=local.dtype))
            box = tuple(slice(o, o + s) for o, s in zip(offset[axes:], local.shape))
            seen = first.get((key, layer, offset))
            if seen is None:
                target[box] = local
                first[(key, layer, offset)] = local
            else:
                spread = (seen - local).abs().max().item()
                out.replica_spread[(key, layer)] = max(out.replica_spread.get((key, layer), 0.0), spread)
    return out


def relative_difference(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` (absolute difference when ``ref`` is all zeros)."""
    denom = ref.norm().item()
    diff = (got - ref).norm().item()
    return diff / denom if denom > 0 else diff


def compare(got: FullGradients, ref: FullGradients) -> dict:
    """``{(key, layer): relative difference}`` for every tensor of ``ref`` (missing -> inf)."""
    out = {}
    for name, r in ref.tensors.items():
        g = got.tensors.get(name)
        out[name] = float("inf") if g is None or g.shape != r.shape else relative_difference(g, r)
    for name in got.tensors:
        out.setdefault(name, float("inf"))
    return out
