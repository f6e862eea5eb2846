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
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel

from megatron_midtrain.errors import UserError

_ITER_RE = re.compile(r"^iter_(\d{7})$")
META = "meta.json"

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


def _sharded_state(model, optimizer, is_loading: bool) -> dict:
    """The sharded state dict of one model stage (+ its optimizer state)."""
    state = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=is_loading)
    return state


def save_checkpoint(run_dir: str, step: int, model, optimizer, scheduler, extra: dict, keep: int) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    root = checkpoint_root(run_dir)
    final = os.path.join(root, f"iter_{step:07d}")
    partial = final + ".partial"
    if _is_rank0():
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    _barrier()
    state = _sharded_state(model, optimizer, is_loading=False)
    # Everything that is not a sharded tensor is "common" state, written once by rank 0.
    state["scheduler"] = scheduler.state_dict()
    state["step"] = step
    dist_checkpointing.save(state, partial)
    # RNG state differs per rank, so it goes beside the sharded checkpoint, one file per rank.
    rank = dist.get_rank() if dist.is_initialized() else 0
    os.makedirs(os.path.join(partial, "rng"), exist_ok=True)
    torch.save(_rng_state(), os.path.join(partial, "rng", f"rank{rank:05d}.pt"))
    _barrier()
    if _is_rank0():
        meta = dict(extra)
        meta["step"] = step
        meta["world_size"] = dist.get_world_size() if dist.is_initialized() else 1
        _write_atomic(os.path.join(partial, META), json.dumps(meta, indent=2, sort_keys=True))
        if os.path.isdir(final):  # a re-save of the same step (e.g. after a resume)
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_atomic(os.path.join(root, "latest"), f"{step}\n")
        if keep > 0:
            for old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(os.path.join(root, f"iter_{old:07d}"), ignore_errors=True)
    _barrier()
    return final


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


def load_model_weights(ckpt_dir: str, model, model_cfg, what: str = "checkpoint") -> dict:
    """Collective: load only the model weights (any TP/PP layout). Returns meta.json."""
    meta = read_meta(ckpt_dir)
    check_compatible(meta, model_cfg, ckpt_dir, what=what)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt_dir)
    model.load_state_dict(loaded["model"])
    return meta


def load_checkpoint(ckpt_dir: str, model, optimizer, scheduler, model_cfg, load_optimizer: bool = True) -> dict:
    """Collective load into the (already built) model/optimizer/scheduler. Returns meta.json."""
    meta = read_meta(ckpt_dir)
    check_compatible(meta, model_cfg, ckpt_dir)
    state = _sharded_state(model, optimizer if load_optimizer else None, is_loading=True)
    loaded = dist_checkpointing.load(state, ckpt_dir)
    model.load_state_dict(loaded["model"])
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
