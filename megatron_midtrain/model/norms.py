"""RMSNorm for megatron's local layer spec that works with sequence parallelism.

Without Apex, megatron-core's local spec normalises with ``WrappedTorchNorm`` (a plain
``torch.nn.RMSNorm``), which refuses ``sequence_parallel=True``: it cannot tag its weight,
and an untagged norm weight would keep only this rank's share of the gradient. This one
tags the weight ``sequence_parallel`` as megatron's fused norms do, so that
``finalize_model_grads`` sums it over TP. Numerically it is the same ``F.rms_norm``, with
the same parameter name (``weight``), so checkpoints are unchanged.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule


class RMSNorm(MegatronModule):
    """RMSNorm over the last dimension, replicated on every TP rank.

    A MegatronModule (not torch.nn.RMSNorm) so that modules whose ``sharded_state_dict`` asks
    every child for its own (megatron's ``MLP``) can checkpoint it. The constructor accepts
    megatron's norm keywords (``persist_layer_norm``, ``zero_centered_gamma``, ...) so it can
    stand wherever the layer spec builds a norm.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(config=config)
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError("megatron_midtrain.model.norms.RMSNorm is a plain RMSNorm (normalization=RMSNorm)")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # Under sequence parallelism the input is this rank's slice of the sequence, so the
        # gradient is partial: megatron sums tagged parameters over TP.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
