"""Process-wide run facts every component needs: seeding, the parameter dtype, the device, rank-0 logging.

They live apart from the trainer so that components the trainer builds (the reference, the
offline scorer, the tools) can use them without importing the trainer.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist

from megatron_midtrain.errors import UserError


def log0(msg: str) -> None:
    """Print on global rank 0 only (every rank when torch.distributed is not initialised)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def seed_everything(seed: int) -> None:
    """Python, numpy, torch and megatron's model-parallel RNG streams."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def param_dtype(cfg) -> torch.dtype:
    """The parameter dtype from train.precision (auto: bf16 on GPU, fp32 on CPU)."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    if precision == "bf16" and not torch.cuda.is_available():
        raise UserError("train.precision=bf16 needs a GPU", "use train.precision=fp32 (or auto) on the CPU")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def default_device() -> torch.device:
    """This rank's CUDA device (``torch.cuda.current_device()``), or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
