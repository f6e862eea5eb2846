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
  backward) before normalising.

Gradient reduction over TP follows megatron-core's own conventions, which
``finalize_model_grads`` applies by parameter *name* and attribute:

* every parameter whose name contains ``q_layernorm``/``k_layernorm`` has its gradient
  SUM-reduced over TP (right for Qwen3's per-head norm, replicated and fed a different
  subset of heads on each rank). The full-width norm therefore keeps the *whole* weight on
  every rank and uses its own heads' slice in the forward: each rank's gradient is zero
  outside its slice, so megatron's sum assembles the full gradient on every rank. (A weight
  sharded like the heads would have its two different halves added together.)
* parameters tagged ``sequence_parallel`` are SUM-reduced over TP when sequence parallelism
  is on: the post-norms see only this rank's part of the sequence then.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from megatron.core import parallel_state
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule

from megatron_midtrain.model.norms import RMSNorm
from megatron_midtrain.model.rotary_cache import RotatedKeySelfAttention


def _post_normed(base: type, name: str, doc: str) -> type:
    """Subclass ``base`` (returns ``(output, bias)``) so that it RMS-normalises its output."""

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        self.post_norm = RMSNorm(config, config.hidden_size, config.layernorm_epsilon)

    def forward(self, *args, **kwargs):
        output, bias = base.forward(self, *args, **kwargs)
        if bias is not None:  # OLMo-2 has no linear biases; fold one in rather than drop it
            output = output + bias
        return self.post_norm(output), None

    return type(name, (base,), {"__init__": __init__, "forward": forward, "__doc__": doc, "__module__": __name__})


PostNormSelfAttention = _post_normed(
    RotatedKeySelfAttention, "PostNormSelfAttention", "SelfAttention (rotated-key KV cache) whose output is RMS-normalised before the residual add (OLMo-2)."
)
PostNormMLP = _post_normed(MLP, "PostNormMLP", "SwiGLU MLP whose output is RMS-normalised before the residual add (OLMo-2).")


class FullWidthQKNorm(MegatronModule):
    """RMSNorm over all heads of Q (or K) together, correct under tensor parallelism.

    megatron builds q/k norms with ``hidden_size=head_dim`` and applies them to
    ``[s, b, heads_local, head_dim]``; ``heads`` tells whether this one normalises the
    query heads or the key/value groups, so it knows the local and global widths. The weight
    is the full width on every rank (replicated, see the module docstring); each rank
    multiplies by the slice of its own heads.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, heads: str = "q"):
        super().__init__(config=config)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        total_heads = config.num_attention_heads if heads == "q" else config.num_query_groups
        self.local_width = total_heads // tp * hidden_size
        self.full_width = total_heads * hidden_size
        self.offset = parallel_state.get_tensor_model_parallel_rank() * self.local_width
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(self.full_width, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # At least fp32 (bf16 activations are normalised in fp32), never *down* from fp64: an
        # fp64 run (the parity tests' exactness check) must not round here to fp32.
        compute = torch.promote_types(x.dtype, torch.float32)
        flat = x.reshape(*shape[:-2], shape[-2] * shape[-1]).to(compute)
        sq_sum = flat.pow(2).sum(dim=-1, keepdim=True)
        group = parallel_state.get_tensor_model_parallel_group()
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            # Autograd-aware: the backward all-reduces the gradient of the shared statistic.
            sq_sum = dist_fn.all_reduce(sq_sum, group=group)
        normed = flat * torch.rsqrt(sq_sum / self.full_width + self.eps)
        weight = self.weight[self.offset: self.offset + self.local_width]
        return (normed * weight.to(compute)).to(x.dtype).reshape(shape)
