"""Parallelism-invariant weight initialisation.

Megatron initialises each TP shard from its own RNG stream, so the same seed
gives different models at TP=1 and TP=2, and pipeline stages consume the RNG in
a different order than a single stage. For mid-training research we want
"same config + same seed = same model" whatever the layout (so losses can be
compared across TP/PP/DP, and a run can be moved between layouts).

We therefore walk megatron's own sharded state dict, which says for every local
tensor which slice of which *global* tensor it is, generate that global tensor
(per layer) from a generator seeded by (seed, key, global layer index), and copy
the local slice in place. The fused SwiGLU fc1 and the tied output layer are
handled by the same metadata megatron uses for checkpoint resharding.
"""

from __future__ import annotations

import math
import zlib

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.dict_utils import nested_values

_ONES = ("layer_norm_weight", "layernorm.weight", "norm.weight")
# Output projections of residual branches get std / sqrt(2 * num_layers) (GPT-2 / Megatron).
_SCALED = ("linear_proj.weight", "linear_fc2.weight")


def _global_value(key: str, shape: tuple[int, ...], layer_offsets: tuple[int, ...], seed: int, std: float, num_layers: int):
    name = key.split("/")[-1]
    if name.endswith(_ONES):
        return torch.ones(shape, dtype=torch.float32)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.float32)
    scale = std / math.sqrt(2.0 * num_layers) if name.endswith(_SCALED) else std
    sub_seed = zlib.crc32(f"{seed}|{key}|{layer_offsets}".encode())
    gen = torch.Generator().manual_seed(sub_seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32) * scale


def _fill(sh: ShardedTensor, seed: int, std: float, num_layers: int) -> None:
    k = sh.prepend_axis_num
    layer_offsets = tuple(sh.global_offset[:k])
    full_shape = tuple(sh.global_shape[k:])
    value = _global_value(sh.key, full_shape, layer_offsets, seed, std, num_layers)
    index = tuple(slice(off, off + size) for off, size in zip(sh.global_offset[k:], sh.local_shape))
    local = value[index].reshape(sh.data.shape)
    with torch.no_grad():
        sh.data.copy_(local.to(dtype=sh.data.dtype, device=sh.data.device))


def sharded_tensors(sharded_state_dict):
    """Every ShardedTensor of a megatron sharded state dict, with factories (e.g. the fused
    gate/up ``linear_fc1``) expanded into the tensors they stand for."""
    for item in nested_values(sharded_state_dict):
        if isinstance(item, ShardedTensorFactory):
            pieces = item.build_fn(item.key, item.data, item.replica_id, None)
            pieces = pieces if isinstance(pieces, list) else list(nested_values(pieces))
        else:
            pieces = [item]
        yield from (sh for sh in pieces if isinstance(sh, ShardedTensor))


@torch.no_grad()
def init_parameters(modules, seed: int, std: float, num_layers: int) -> int:
    """Fill every parameter of ``modules`` (unwrapped GPTModel stages) deterministically.

    Returns the number of tensors initialised.
    """
    count = 0
    for module in modules:
        for sh in sharded_tensors(module.sharded_state_dict()):
            if sh.data is not None and sh.data.is_floating_point():
                _fill(sh, seed, std, num_layers)
                count += 1
    return count
