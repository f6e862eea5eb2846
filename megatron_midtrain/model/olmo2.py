"""OLMo-2 building blocks for megatron-core's layer spec.

OLMo-2 differs from Llama in two places:

* **Post-norm residual branches**: ``h = x + RMSNorm(attn(x))`` and
  ``out = h + RMSNorm(mlp(h))`` (no pre-norms). We keep megatron's
  ``TransformerLayer`` and put the norm *inside* the branch: the attention and
  MLP modules below normalise their own output (after the row-parallel
  projection has all-reduced it, so the norm sees the full hidden vector).
* **QK-norm over the full projection width** (``num_heads * head_dim``), not per
  head as in Qwen3. Under tensor parallelism each rank holds only some heads,
  so the sum of squares is all-reduced across the TP group (forward and
  backward) before normalising; the norm weight is sharded like the heads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from megatron.core import parallel_state
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint


class ReplicatedRMSNorm(MegatronModule):
    """RMSNorm over the full hidden vector, replicated on every TP rank.

    A MegatronModule (not torch.nn.RMSNorm) so that megatron's ``MLP.sharded_state_dict``,
    which asks every child for its sharded state dict, can checkpoint it.
    """

    def __init__(self, config, hidden_size: int, eps: float):
        super().__init__(config=config)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _post_normed(base: type, name: str, doc: str) -> type:
    """Subclass ``base`` (returns ``(output, bias)``) so that it RMS-normalises its output."""

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        self.post_norm = ReplicatedRMSNorm(config, config.hidden_size, config.layernorm_epsilon)

    def forward(self, *args, **kwargs):
        output, bias = base.forward(self, *args, **kwargs)
        if bias is not None:  # OLMo-2 has no linear biases; fold one in rather than drop it
            output = output + bias
        return self.post_norm(output), None

    return type(name, (base,), {"__init__": __init__, "forward": forward, "__doc__": doc, "__module__": __name__})


PostNormSelfAttention = _post_normed(
    SelfAttention, "PostNormSelfAttention", "SelfAttention whose output is RMS-normalised before the residual add (OLMo-2)."
)
PostNormMLP = _post_normed(MLP, "PostNormMLP", "SwiGLU MLP whose output is RMS-normalised before the residual add (OLMo-2).")


class FullWidthQKNorm(MegatronModule):
    """RMSNorm over all heads of Q (or K) together, correct under tensor parallelism.

    megatron builds q/k norms with ``hidden_size=head_dim`` and applies them to
    ``[s, b, heads_local, head_dim]``; ``heads`` tells whether this one normalises the
    query heads or the key/value groups, so it knows the local and global widths.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, heads: str = "q"):
        super().__init__(config=config)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        total_heads = config.num_attention_heads if heads == "q" else config.num_query_groups
        self.local_width = total_heads // tp * hidden_size
        self.full_width = total_heads * hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(self.local_width, dtype=config.params_dtype))
        # Megatron's TP bookkeeping (grad norm, checkpoint resharding): sharded along dim 0.
        self.weight.tensor_model_parallel = True
        self.weight.partition_dim = 0
        self.weight.partition_stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(*shape[:-2], shape[-2] * shape[-1]).float()
        sq_sum = flat.pow(2).sum(dim=-1, keepdim=True)
        group = parallel_state.get_tensor_model_parallel_group()
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            # Autograd-aware: the backward all-reduces the gradient of the shared statistic.
            sq_sum = dist_fn.all_reduce(sq_sum, group=group)
        normed = flat * torch.rsqrt(sq_sum / self.full_width + self.eps)
        return (normed * self.weight.float()).to(x.dtype).reshape(shape)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        return {
            f"{prefix}weight": make_tp_sharded_tensor_for_checkpoint(
                self.weight, f"{prefix}weight", tp_axis=0, prepend_offsets=sharded_offsets
            )
        }
