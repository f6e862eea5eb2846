"""The run directory: where a run lives, its config.yaml, and what resuming from it requires."""

from __future__ import annotations

import dataclasses
import os
from datetime import datetime, timezone

import torch.distributed as dist
from omegaconf import OmegaConf

from megatron_midtrain.errors import UserError
from megatron_midtrain.training import checkpoint as ckpt
from megatron_midtrain.training.distributed import broadcast_object
from megatron_midtrain.training.runtime import log0


def choose_run_dir(cfg, rank0: bool) -> str:
    """``run.dir``, or ``runs/<run.name>-<UTC time>``; every rank gets rank 0's choice (timestamps differ)."""
    run_dir = cfg.run.dir
    if not run_dir and rank0:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_dir = os.path.join("runs", f"{cfg.run.name}-{stamp}")
    run_dir = os.path.abspath(broadcast_object(run_dir))
    cfg.run.dir = run_dir
    return run_dir


def write_run_config(cfg, run_dir: str, rank0: bool) -> None:
    """``<run dir>/config.yaml`` (atomic), once every input has been validated."""
    if rank0:
        os.makedirs(run_dir, exist_ok=True)
        text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        tmp = os.path.join(run_dir, "config.yaml.tmp")
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, os.path.join(run_dir, "config.yaml"))
    if dist.is_initialized():
        dist.barrier()


def check_resumable(cfg, run_dir: str, rank0: bool) -> dict | None:
    """meta.json of the checkpoint to resume from (None for a fresh run), after checking
    that it matches this config's architecture and batch (and that ``train.init_from`` loads)."""
    root = ckpt.checkpoint_root(run_dir)
    step = broadcast_object(ckpt.latest_checkpoint(root) if rank0 else None)
    if step is None:
        if cfg.train.init_from:  # fail on a bad init checkpoint before writing anything
            path = ckpt.resolve_checkpoint_dir(cfg.train.init_from, what="train.init_from")
            ckpt.check_compatible(ckpt.read_meta(path), cfg.model, path, what="train.init_from")
        return None
    path = os.path.join(root, f"iter_{step:07d}")
    meta = ckpt.read_meta(path)
    ckpt.check_compatible(meta, cfg.model, path)
    if meta.get("global_batch_tokens") not in (None, cfg.train.global_batch_tokens):
        raise UserError(
            f"{path} was trained with train.global_batch_tokens={meta['global_batch_tokens']}, "
            f"the config says {cfg.train.global_batch_tokens}",
            "resume with the same global batch or start a new run.dir",
        )
    meta["path"] = path
    return meta


def resume(cfg, meta: dict | None, model, optimizer, scheduler) -> int:
    """Load the checkpoint ``meta`` describes (or ``train.init_from``'s weights); the step to continue from."""
    if meta is None:
        if cfg.train.init_from:
            path = ckpt.resolve_checkpoint_dir(cfg.train.init_from, what="train.init_from")
            ckpt.load_model_weights(path, model.module, cfg.model, what="train.init_from")
            log0(f"initialised the model from {path}")
        return 0
    ckpt.load_checkpoint(meta["path"], model.module, optimizer, scheduler, cfg.model)
    log0(f"resumed from {meta['path']} (step {meta['step']})")
    return meta["step"]


def checkpoint_meta(cfg, step: int, tokenizer_id: str | None, tokenizer_path: str) -> dict:
    """What a checkpoint's meta.json records: enough to check a resume and to rebuild the model
    and its tokenizer from the checkpoint alone (tools)."""
    return {
        "arch": ckpt.arch_signature(cfg.model),
        "layout": ckpt.layout(),
        "consumed_tokens": step * cfg.train.global_batch_tokens,
        "global_batch_tokens": cfg.train.global_batch_tokens,
        "seq_length": cfg.data.seq_length,
        "method": cfg.method.name,
        "tokenizer": tokenizer_id,
        "model_config": dataclasses.asdict(cfg.model),
        "tokenizer_path": tokenizer_path,
        "seed": cfg.run.seed,
    }
