"""The one way a checkpoint becomes a frozen model stage (references, scorers, log-prob tools)."""

from __future__ import annotations

import torch

from megatron_midtrain.model.builder import build_gpt_stage


def load_frozen_stage(path: str, model_cfg, transformer_config, seq_length: int, use_te: bool,
                      what: str = "checkpoint"):
    """Build this rank's GPTModel stage (current TP/PP groups), load ``path``'s weights, freeze it.

    The stage goes to the current CUDA device when there is one; it has no gradients and is in
    eval mode. Building draws from torch's RNG (initialisation) exactly like any other stage.
    Collective; megatron's parallel state (and its RNG tracker) must be set up. ``what`` names
    the checkpoint in errors. Returns ``(stage, meta)`` (meta: the checkpoint's meta.json).
    """
    from megatron_midtrain.training import checkpoint as ckpt

    stage = build_gpt_stage(model_cfg, transformer_config, seq_length, use_te)
    if torch.cuda.is_available():
        stage.cuda(torch.cuda.current_device())
    meta = ckpt.load_model_weights(path, stage, model_cfg, what=what)
    stage.requires_grad_(False)
    stage.eval()
    return stage, meta
