"""Synthetic Hugging Face model folders (random weights, any size) for tests and benchmarks.

Tensors are generated and written one at a time into safetensors shards, so a folder for
an 8B-parameter config can be made with a few hundred MB of memory. Names and shapes come
from the same conversion table as the importer, for a ``config.json`` of a supported family.
"""

from __future__ import annotations

import json
import os

import torch

from megatron_midtrain.convert.families import model_config_from_hf
from megatron_midtrain.convert.hf_io import ShardedSafetensorsWriter
from megatron_midtrain.convert.mappings import build_mappings


def write_synthetic_hf(out_dir: str, hf_config: dict, seed: int = 0, std: float = 0.02,
                       dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 2 * 2**30) -> int:
    """Write config.json + random safetensors for ``hf_config``; returns the number of bytes."""
    from megatron_midtrain.convert.api import _hf_shapes

    os.makedirs(out_dir, exist_ok=True)
    _, model = model_config_from_hf(hf_config, out_dir)
    gen = torch.Generator().manual_seed(seed)
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    for m in build_mappings(model):
        for layer in (range(model.num_layers) if m.per_layer else [None]):
            for name, shape in zip(m.hf_names(layer), _hf_shapes(m, model)):
                if "norm" in name:
                    t = 1.0 + std * torch.randn(shape, generator=gen)
                else:
                    t = std * torch.randn(shape, generator=gen)
                writer.add(name, t.to(dtype))
                del t
    writer.close()
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(dict(hf_config, torch_dtype=str(dtype).replace("torch.", "")), fh, indent=2)
    return writer.total_bytes
