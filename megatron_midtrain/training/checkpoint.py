"""Distributed checkpoints (megatron-core dist_checkpointing) that are atomic and resumable.

Layout under ``<run.dir>/checkpoints``::

    iter_0000050/          a complete checkpoint (dist_checkpointing format + meta.json)
    iter_0000100.partial/  being written, or interrupted: never loaded
    latest                 text file with the newest complete step (written atomically)

A checkpoint is written into ``iter_N.partial``; only after every rank has
finished and rank 0 has written ``meta.json`` is it renamed to ``iter_N`` and
``latest`` updated with an atomic ``os.replace``. A SIGKILL at any moment
therefore leaves either the previous state or the new complete one.

dist_checkpointing stores tensors by *global* name and offset, so a checkpoint
written at TP=2 loads at TP=1 and vice versa (model and optimizer state).

Checkpoints are portable between megatron's local layer spec (CPU, ``import-hf``) and the
Transformer Engine (TE) spec: the local spec's ``sharded_state_dict_keys_map`` already writes
TE's names (``input_layernorm.weight`` -> ``self_attention.linear_qkv.layer_norm_weight``).
What differs is TE's ``_extra_state`` (FP8 metadata): present on modules the local spec does
not have, ``None`` in local checkpoints. Loading tolerates any ``_extra_state`` the checkpoint
lacks (the module keeps its freshly initialised one) and refuses, with a UserError on every
rank, any *tensor* it lacks (see tests/test_checkpoint_portability.py).

With ``async_save`` the tensors are written by a background process (megatron's async
dist_checkpointing); ``meta.json``, the rename and ``latest`` happen in its finalisation, after
every rank's write has finished, so a crash never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import extract_matching_values, nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedObject
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

from megatron_midtrain.errors import UserError

_ITER_RE = re.compile(r"^iter_(\d{7})$")
META = "meta.json"
EXTRA_STATE = "_extra_state"

#: Model fields that must match for a checkpoint to be loadable (layout-independent).
ARCH_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "head_dim", "vocab_size", "qkv_bias", "qk_norm", "qk_norm_scope", "norm_placement",
    "tie_embeddings", "no_rope_layers",
)


def arch_signature(model_cfg) -> dict:
    cfg = asdict(model_cfg) if not isinstance(model_cfg, dict) else model_cfg
    return {k: cfg.get(k) for k in ARCH_FIELDS}


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def complete_checkpoints(root: str) -> list[int]:
    """Steps of complete checkpoints (directory renamed into place and meta.json present)."""
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        match = _ITER_RE.match(name)
        if match and os.path.isfile(os.path.join(root, name, META)):
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_checkpoint(root: str) -> int | None:
    steps = complete_checkpoints(root)
    return steps[-1] if steps else None


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


#: How megatron's DistributedOptimizer lays out its state in a checkpoint, pinned rather than
#: left to megatron's default: "fully_sharded_model_space" stores each parameter's state under
#: the parameter's global key and offsets, so it reshards over TP, PP and DP ("dp_reshardable"
#: would follow the optimizer's internal buffers and reshard over DP only). The plain
#: optimizer (CPU) always stores per-parameter state and ignores this.
OPTIMIZER_CKPT_METADATA = {"distrib_optim_sharding_type": "fully_sharded_model_space"}


def _sharded_state(model, optimizer, is_loading: bool) -> dict:
    """The sharded state dict of one model stage (+ its optimizer state)."""
    state = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=is_loading,
                                                          metadata=dict(OPTIMIZER_CKPT_METADATA))
    return state


def save_checkpoint(run_dir: str, step: int, model, optimizer, scheduler, extra: dict, keep: int,
                    async_save: bool = False) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    With ``async_save`` it returns once the state is staged; the checkpoint becomes complete
    (meta.json, rename, ``latest``) when :func:`finalize_async_saves` or :func:`poll_async_saves`
    finds every rank's write finished.
    """
    finalize_async_saves()  # one save in flight at a time: the previous one completes first
    root = checkpoint_root(run_dir)
    final = os.path.join(root, f"iter_{step:07d}")
    partial_dir = final + ".partial"
    if _is_rank0():
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial_dir, ignore_errors=True)
        os.makedirs(partial_dir)
    _barrier()
    state = _sharded_state(model, optimizer, is_loading=False)
    # Everything that is not a sharded tensor is "common" state, written once by rank 0.
    state["scheduler"] = scheduler.state_dict()
    state["step"] = step
    # RNG state differs per rank, so it goes beside the sharded checkpoint, one file per rank.
    # Captured now (this step's state, whenever the tensors reach the disk) but written once
    # dist_checkpointing.save has started: megatron warns "Overwriting old incomplete /
    # corrupted checkpoint" on every save into a directory that is not empty when it begins.
    # Rank 0 checks that before the save's first collective, so no rank can write earlier.
    rng = _rng_state()
    publish = partial(_publish, root, final, partial_dir, step, extra, keep)
    if not async_save:
        dist_checkpointing.save(state, partial_dir)
        _write_rng(partial_dir, rng)
        publish()
        return final
    request = dist_checkpointing.save(state, partial_dir, async_sharded_save=True)
    _write_rng(partial_dir, rng)
    # megatron runs finalize functions on every rank once all ranks' writes are done, after
    # its own (which check the write results and write metadata.json).
    request.add_finalize_fn(publish)
    _async_queue().schedule_async_request(request)
    return final


def _write_rng(partial_dir: str, rng: dict) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    os.makedirs(os.path.join(partial_dir, "rng"), exist_ok=True)
    torch.save(rng, os.path.join(partial_dir, "rng", f"rank{rank:05d}.pt"))


def _publish(root: str, final: str, partial_dir: str, step: int, extra: dict, keep: int) -> None:
    """Collective: make the written ``partial_dir`` the complete checkpoint ``final``."""
    _barrier()
    if _is_rank0():
        meta = dict(extra)
        meta["step"] = step
        meta["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
        _write_atomic(os.path.join(partial_dir, META), json.dumps(meta, indent=2, sort_keys=True))
        if os.path.isdir(final):  # a re-save of the same step (e.g. after a resume)
            shutil.rmtree(final)
        os.replace(partial_dir, final)
        _write_atomic(os.path.join(root, "latest"), f"{step}\n")
        if keep > 0:
            for old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(os.path.join(root, f"iter_{old:07d}"), ignore_errors=True)
    _barrier()


_ASYNC_QUEUE = None  # megatron's AsyncCallsQueue of this process's unfinished async saves


def _async_queue():
    global _ASYNC_QUEUE
    if _ASYNC_QUEUE is None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        _ASYNC_QUEUE = AsyncCallsQueue()
    return _ASYNC_QUEUE


def pending_async_saves() -> int:
    return _ASYNC_QUEUE.get_num_unfinalized_calls() if _ASYNC_QUEUE is not None else 0


def finalize_async_saves() -> None:
    """Collective: wait for the async save in flight (if any) and complete it."""
    if pending_async_saves():
        _ASYNC_QUEUE.maybe_finalize_async_calls(blocking=True)


def poll_async_saves() -> None:
    """Collective: complete the async save in flight if every rank has finished writing it."""
    if pending_async_saves():
        _ASYNC_QUEUE.maybe_finalize_async_calls(blocking=False)


def read_meta(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, META)
    if not os.path.isfile(path):
        raise UserError(f"{ckpt_dir} is not a complete megatron_midtrain checkpoint (no {META})", "point at an iter_NNNNNNN directory that finished writing")
    with open(path) as fh:
        return json.load(fh)


def check_compatible(meta: dict, model_cfg, ckpt_dir: str, what: str = "checkpoint") -> None:
    """Refuse a checkpoint whose architecture differs, naming the first differing field."""
    saved = dict(meta.get("arch", {}))
    current = arch_signature(model_cfg)
    # head_dim=None means hidden_size / heads: an explicit equal value is the same architecture.
    for sig in (saved, current):
        if sig.get("head_dim") is None and sig.get("hidden_size") and sig.get("num_attention_heads"):
            sig["head_dim"] = sig["hidden_size"] // sig["num_attention_heads"]
    for key in ARCH_FIELDS:
        if key in saved and saved[key] != current[key]:
            fix = (
                "use the model config the checkpoint was saved with, or a new run.dir"
                if what == "checkpoint"
                else "the reference must have the policy's architecture and vocabulary"
            )
            raise UserError(f"{what} {ckpt_dir} has model.{key}={saved[key]} but the config has {current[key]}", fix)


def resolve_checkpoint_dir(path: str, what: str = "checkpoint") -> str:
    """Accept an ``iter_NNNNNNN`` directory, a ``checkpoints/`` root or a run directory."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    for root in (path, checkpoint_root(path)):
        step = latest_checkpoint(root)
        if step is not None:
            return os.path.join(root, f"iter_{step:07d}")
    raise UserError(f"{what} {path} holds no complete checkpoint", "point at a run dir, its checkpoints/ or an iter_NNNNNNN directory")


def _is_extra_state(key: str) -> bool:
    return key.endswith(EXTRA_STATE)


def _load_sharded(state: dict, ckpt_dir: str) -> dict:
    """dist_checkpointing.load of ``state``, without the ``_extra_state`` objects the checkpoint
    lacks (TE modules loading a local-spec checkpoint).

    Collective. What is stored is read off the checkpoint's metadata before anything loads, so a
    missing *tensor* raises one UserError on every rank (a pipeline stage that has all its
    tensors would otherwise wait in the load's collectives) instead of megatron's deep error.
    """
    # Values, not dict keys: those of sharded objects carry a '/shard_<offset>' suffix.
    stored = {v.key for v in load_sharded_metadata(ckpt_dir).values()}
    _, state = extract_matching_values(
        state, lambda v: isinstance(v, ShardedObject) and _is_extra_state(v.key) and v.key not in stored)
    absent = sorted({v.key for v in nested_values(state) if isinstance(v, ShardedBase) and v.key not in stored})
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, absent)
        absent = sorted(set().union(*everyone))
    if not absent:
        return dist_checkpointing.load(state, ckpt_dir)
    model_keys = [k for k in absent if not k.startswith("optimizer.")]
    if not model_keys:
        raise UserError(
            f"checkpoint {ckpt_dir} has no optimizer state for {len(absent)} entries this run needs (e.g. {absent[0]}): "
            "it holds only weights (import-hf) or was saved with another train.precision or parallel.distributed_optimizer",
            f"start a new run.dir with train.init_from={ckpt_dir} (its weights, a fresh optimizer), "
            "or resume with the settings it was saved with",
        )
    raise UserError(
        f"checkpoint {ckpt_dir} lacks {len(model_keys)} model tensor(s) this model needs (e.g. {model_keys[0]}): "
        "it was written by a model of another module structure, not by this package's local or "
        "Transformer Engine spec of this model config",
        "export it to Hugging Face format with the code that wrote it, then run tools/convert_checkpoint.py import-hf",
    )


def _load_model_state(model, state: dict, ckpt_dir: str) -> None:
    """``model.load_state_dict`` in which only ``_extra_state`` may be absent."""
    # A local-spec checkpoint stores None as every linear's extra state: nothing to restore, so
    # a TE module keeps its freshly initialised FP8 metadata rather than being handed None.
    state = {k: v for k, v in state.items() if not (_is_extra_state(k) and v is None)}
    result = model.load_state_dict(state, strict=False)
    problems = [k for k in result.missing_keys if not _is_extra_state(k)] + list(result.unexpected_keys)
    if problems:
        raise UserError(f"checkpoint {ckpt_dir} does not fit this model: {len(problems)} parameter(s) unmatched "
                        f"(e.g. {problems[0]})", "load it with the model config it was saved with")


def load_model_weights(ckpt_dir: str, model, model_cfg, what: str = "checkpoint") -> dict:
    """Collective: load only the model weights (any TP/PP layout, local or TE spec). Returns meta.json."""
    meta = read_meta(ckpt_dir)
    check_compatible(meta, model_cfg, ckpt_dir, what=what)
    loaded = _load_sharded({"model": model.sharded_state_dict()}, ckpt_dir)
    _load_model_state(model, loaded["model"], ckpt_dir)
    return meta


def load_checkpoint(ckpt_dir: str, model, optimizer, scheduler, model_cfg, load_optimizer: bool = True) -> dict:
    """Collective load into the (already built) model/optimizer/scheduler. Returns meta.json."""
    meta = read_meta(ckpt_dir)
    check_compatible(meta, model_cfg, ckpt_dir)
    state = _sharded_state(model, optimizer if load_optimizer else None, is_loading=True)
    loaded = _load_sharded(state, ckpt_dir)
    _load_model_state(model, loaded["model"], ckpt_dir)
    if load_optimizer and optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = os.path.join(ckpt_dir, "rng", f"rank{rank:05d}.pt")
    same_layout = meta.get("world_size") == (dist.get_world_size() if dist.is_initialized() else 1) and meta.get("layout") == layout()
    if same_layout and os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return meta


def layout() -> list[int]:
    """[TP, PP, DP] of this process group layout (RNG state is restored only on the same one)."""
    return [
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(),
    ]
