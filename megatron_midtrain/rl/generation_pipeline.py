"""One forward pass of :func:`megatron_midtrain.rl.generation.generate` through this rank's
pipeline stage, the sharing of the chosen tokens over TP/PP, and switching sequence
parallelism off for generation (see the ``generation`` module docstring)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

#: Attributes megatron uses to switch sequence parallelism on a module (see
#: ``megatron.core.transformer.utils.set_model_to_sequence_parallel``).
_SP_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


class StagePipeline:
    """This rank's place in the model-parallel group and the p2p / broadcast plumbing."""

    def __init__(self, model, device: torch.device):
        from megatron.core import parallel_state as ps

        self.model = model
        self.device = device
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.first = ps.is_pipeline_first_stage(ignore_virtual=True)
        self.last = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.pp_group = ps.get_pipeline_model_parallel_group() if self.pp_size > 1 else None
        self.tp_group = ps.get_tensor_model_parallel_group() if self.tp_size > 1 else None
        if self.pp_size > 1:
            self.prev_rank = ps.get_pipeline_model_parallel_prev_rank()
            self.next_rank = ps.get_pipeline_model_parallel_next_rank()
            self.pp_last_rank = ps.get_pipeline_model_parallel_last_rank()
        if self.tp_size > 1:
            self.tp_src_rank = ps.get_tensor_model_parallel_src_rank()
        config = model.config
        self.hidden = config.hidden_size
        self.pipe_dtype = config.pipeline_dtype or config.params_dtype

    def forward(self, tokens: torch.Tensor, start: int, context, pad: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Run ``tokens`` ``[b, s]`` (at positions ``start..start+s-1``) through this stage.

        ``pad`` ``[b]``: left-padding per row (positions count from each row's first real
        token); ``mask`` ``[b, 1, s, keys]``: megatron attention mask (True = forbidden), or
        None for plain causal attention. Returns the last position's full-vocabulary logits
        ``[b, V_padded]`` on the last stage, ``None`` elsewhere.
        """
        b, s = tokens.shape
        if not self.first:
            received = torch.empty(s, b, self.hidden, dtype=self.pipe_dtype, device=self.device)
            dist.recv(received, src=self.prev_rank, group=self.pp_group)
            self.model.set_input_tensor(received)
        elif self.pp_size > 1:
            self.model.set_input_tensor(None)
        positions = torch.arange(start, start + s, device=self.device).unsqueeze(0).expand(b, s)
        if pad is not None:  # only learned absolute position embeddings read these; RoPE is relative
            positions = (positions - pad[:, None]).clamp(min=0)
        output = self.model(tokens, positions, mask, inference_context=context, runtime_gather_output=True)
        if context is not None:
            context.increment_sequence_len_offset(s)
        if not self.last:
            dist.send(output.to(self.pipe_dtype).contiguous(), dst=self.next_rank, group=self.pp_group)
            return None
        return output[:, -1, :]  # [b, s or 1, V] -> [b, V]

    def share(self, chosen: Optional[torch.Tensor], rows: int) -> torch.Tensor:
        """The last stage's chosen tokens ``[rows]`` -> the same tensor on every rank."""
        if not self.last:
            chosen = torch.empty(rows, dtype=torch.long, device=self.device)
        chosen = chosen.to(torch.long).contiguous()
        if self.last and self.tp_size > 1:  # TP rank 0 of the last stage decides
            dist.broadcast(chosen, src=self.tp_src_rank, group=self.tp_group)
        if self.pp_size > 1:
            dist.broadcast(chosen, src=self.pp_last_rank, group=self.pp_group)
        return chosen


def sequence_parallel_off(model) -> list:
    """Switch sequence parallelism off on every module that has the flag; returns what to restore."""
    saved = []
    for module in model.modules():
        for attr in _SP_ATTRS:
            if getattr(module, attr, False) is True:
                saved.append((module, attr))
                setattr(module, attr, False)
    if getattr(model.config, "sequence_parallel", False):
        saved.append((model.config, "sequence_parallel"))
        model.config.sequence_parallel = False
    return saved


def forget_inference_tensors() -> None:
    """Drop what megatron cached during a generate call: its RoPE tables (``RotaryEmbedding.forward``
    and the YaRN variant are ``functools.lru_cache``-d per (module, length, offset)) hold inference
    tensors made under ``torch.inference_mode``, which a later training forward must not receive
    (autograd refuses to save an inference tensor for backward). Rebuilding them costs one small
    ``outer`` product per length on the next forward."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

    for cls in (RotaryEmbedding, YarnRotaryEmbedding):
        cache_clear = getattr(cls.forward, "cache_clear", None)
        if cache_clear is not None:
            cache_clear()
