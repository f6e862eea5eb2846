"""Streaming access to megatron_midtrain (megatron-core ``dist_checkpointing``) checkpoints.

What a checkpoint contains (keys, global shapes, how the SwiGLU ``linear_fc1`` is split, the
``_extra_state`` objects, ...) is not written down here: it is read off megatron itself, from
the ``sharded_state_dict()`` of a GPTModel built on the ``meta`` device (no memory). The
same table the trainer writes and loads is therefore what conversion writes and reads.

* Writing (:func:`save_lazily`): megatron's own save path validates the sharding and writes
  ``common.pt`` / ``metadata.json``; the tensors go through torch's DCP ``FileSystemWriter``
  with a planner that produces each chunk only when the writer asks for it (megatron's
  async writer would first materialise every tensor). Peak memory: one tensor.
* Reading (:class:`CheckpointReader`): torch DCP reads of one layer's box of each stacked
  tensor (or the embedding / final norm / head) at a time.
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron_midtrain.errors import UserError

#: (sharded key, layer or None) -> the global tensor of that layer (no layer axis).
TensorSource = Callable[[str, "int | None"], torch.Tensor]


def ensure_process_group() -> None:
    """A 1-rank gloo/NCCL group + TP1/PP1 megatron state (conversion is single-process)."""
    from megatron_midtrain.eval.checkpoint_logprobs import ensure_single_process_parallel_state

    ensure_single_process_parallel_state()


def meta_model(model_cfg, dtype: torch.dtype):
    """A whole (TP1/PP1) GPTModel on the meta device: structure and checkpoint keys only."""
    from megatron_midtrain.config.schema import ParallelConfig
    from megatron_midtrain.model.builder import build_gpt_stage, build_transformer_config

    config = build_transformer_config(model_cfg, ParallelConfig(), dtype)
    with torch.device("meta"):
        return build_gpt_stage(model_cfg, config, model_cfg.max_position_embeddings, use_te=False)


def layer_of(name: str) -> int | None:
    """Layer index of a (non-sharded) state-dict name like ``decoder.layers.3.mlp...``."""
    parts = name.split(".")
    return int(parts[2]) if name.startswith("decoder.layers.") else None


def checkpoint_tensor_keys(sharded_state_dict) -> dict[str, tuple[int, tuple[int, ...]]]:
    """sharded key -> (number of prepended layer axes, global shape) for every tensor."""
    from megatron_midtrain.model.init import sharded_tensors

    return {sh.key: (sh.prepend_axis_num, tuple(sh.global_shape)) for sh in sharded_tensors(sharded_state_dict)}


def _lazy_classes():
    """Planner/strategy classes, defined on first use (megatron imports are slow)."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazyPlanner(MCoreSavePlanner):
        """Resolves each tensor chunk from ``source`` when the writer reaches it."""

        def __init__(self, source: TensorSource, keys, **kwargs):
            super().__init__(**kwargs)
            self.source = source
            self.keys = keys
            self._last = (None, None)  # the two halves of linear_fc1 are consecutive chunks

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            key = write_item.index.fqn
            offsets = tuple(write_item.index.offset)
            sizes = tuple(write_item.tensor_data.chunk.sizes)
            axes, _ = self.keys[key]
            layer = offsets[0] if axes else None
            if self._last[0] != (key, layer):
                self._last = ((key, layer), None)  # drop the previous tensor before building the next
                self._last = ((key, layer), self.source(key, layer))
            full = self._last[1]
            index = tuple(slice(o, o + s) for o, s in zip(offsets[axes:], sizes[axes:]))
            chunk = full[index].reshape(sizes)
            return chunk.to(write_item.tensor_data.properties.dtype).contiguous()

    class LazySaveStrategy(SaveShardedStrategy):
        def __init__(self, source: TensorSource):
            super().__init__("torch_dist", 1)
            self.source = source

        @property
        def can_handle_sharded_objects(self):
            return True

        def save(self, sharded_state_dict, checkpoint_dir):
            keys = checkpoint_tensor_keys(sharded_state_dict)
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
            pyt_state = mcore_to_pyt_state_dict(flat, False)
            writer = dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1)
            planner = LazyPlanner(self.source, keys, dedup_replicated_tensors=False, flatten_state_dict=False)
            dcp.save(pyt_state, storage_writer=writer, planner=planner)

    return LazySaveStrategy


def save_lazily(model_cfg, dtype: torch.dtype, source: TensorSource, checkpoint_dir: str) -> dict:
    """Write the model weights of ``model_cfg`` into ``checkpoint_dir`` (exists, empty),
    taking every tensor from ``source``. Returns the checkpoint's tensor table."""
    from megatron.core import dist_checkpointing

    model = meta_model(model_cfg, dtype)
    state = {"model": model.sharded_state_dict()}
    keys = checkpoint_tensor_keys(state)
    dist_checkpointing.save(state, checkpoint_dir, sharded_strategy=_lazy_classes()(source))
    return keys


def checkpoint_dtype(checkpoint_dir: str) -> torch.dtype:
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(checkpoint_dir).read_metadata()
    return meta.state_dict_metadata["embedding.word_embeddings.weight"].properties.dtype


def _chunk_planner_class():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class ChunkLoadPlanner(DefaultLoadPlanner):
        """Reads arbitrary boxes of global checkpoint tensors into given buffers.

        megatron's loader cannot do this in a 1-rank world (it maps the layers it is not asked
        for to "another rank", which is rank 0 again), so the reads are planned directly:
        torch's resharding helper finds the stored chunks overlapping each requested box."""

        def __init__(self, requests: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]]):
            super().__init__()
            self.requests = requests
            self.buffers = {(k, tuple(off)): buf for k, boxes in requests.items() for off, buf in boxes}

        def create_local_plan(self):
            items = []
            for key, boxes in self.requests.items():
                md = self.metadata.state_dict_metadata[key]
                chunks = [ChunkStorageMetadata(offsets=torch.Size(off), sizes=buf.shape) for off, buf in boxes]
                items += create_read_items_for_chunk_list(key, md, chunks)
            self.plan = LoadPlan(items)
            return self.plan

        def resolve_tensor(self, read_item):
            buf = self.buffers[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
            for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
                buf = buf.narrow(dim, start, length)
            return buf

    return ChunkLoadPlanner


class CheckpointReader:
    """Read a checkpoint's model weights one layer at a time, as global (unsharded) tensors."""

    def __init__(self, checkpoint_dir: str, model_cfg, dtype: torch.dtype | None = None):
        from torch.distributed.checkpoint import FileSystemReader

        self.dir = checkpoint_dir
        self.dtype = dtype or checkpoint_dtype(checkpoint_dir)
        stored = FileSystemReader(checkpoint_dir).read_metadata().state_dict_metadata
        self.keys = checkpoint_tensor_keys(meta_model(model_cfg, self.dtype).sharded_state_dict())
        for key, (axes, shape) in self.keys.items():
            if key not in stored:
                raise UserError(f"checkpoint {checkpoint_dir} has no tensor {key}", "use a complete checkpoint of this model")
            if tuple(stored[key].size) != shape:
                raise UserError(f"checkpoint {checkpoint_dir}: tensor {key} has shape {list(stored[key].size)}, the model "
                                f"config in meta.json implies {list(shape)}", "the checkpoint and its meta.json disagree")
        self.layers = list(range(model_cfg.num_layers))

    def load(self, layer: int | None, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        """``{sharded key: tensor}`` for one layer (or ``None``: the non-layer tensors),
        optionally only ``keys``."""
        import torch.distributed.checkpoint as dcp

        requests, out = {}, {}
        for key, (axes, shape) in self.keys.items():
            if (axes > 0) != (layer is not None) or (keys is not None and key not in keys):
                continue
            buf = torch.empty((1,) * axes + shape[axes:], dtype=self.dtype)
            requests[key] = [((layer,) * axes + (0,) * (len(shape) - axes), buf)]
            out[key] = buf.reshape(shape[axes:])
        dcp.load({}, storage_reader=dcp.FileSystemReader(self.dir), planner=_chunk_planner_class()(requests), no_dist=True)
        return out
