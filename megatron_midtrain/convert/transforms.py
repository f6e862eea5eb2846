"""Typed tensor transforms between Hugging Face and megatron-core layouts.

Every transform maps a fixed number of HF tensors to one megatron tensor and back
(``to_hf(to_megatron(x)) == x`` bit for bit): conversion only moves values, it never
does arithmetic on them, so export-then-import is exact in any dtype.

Megatron's fused QKV projection is grouped by KV head: for each of the ``G`` key/value
groups it holds that group's ``H/G`` query heads, then its key head, then its value head
(``[q_g0..., k_g0, v_g0, q_g1..., k_g1, v_g1, ...]``). Hugging Face keeps three separate
projections with heads in order, and query head ``h`` uses KV head ``h // (H/G)`` (its
``repeat_kv``). The same interleaving applies to the QKV bias (Qwen2). Tensor parallelism
then splits the fused tensor by whole groups, which is why the grouping matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Transform:
    """Base class: ``arity`` HF tensors <-> one megatron tensor."""

    arity = 1

    def to_megatron(self, hf: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def to_hf(self, tensor: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def megatron_shape(self, hf_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        """Shape of the megatron tensor built from HF tensors of these shapes (metadata only)."""
        return tuple(hf_shapes[0])


@dataclass(frozen=True)
class Identity(Transform):
    """Same tensor under another name (norms, o_proj, down_proj, ...)."""

    def to_megatron(self, hf):
        return hf[0]

    def to_hf(self, tensor):
        return [tensor]


@dataclass(frozen=True)
class QKVInterleave(Transform):
    """q/k/v projections (weights ``[out, in]`` or biases ``[out]``) <-> megatron's grouped QKV."""

    num_heads: int
    num_groups: int
    head_dim: int
    arity = 3

    @property
    def _per_group(self) -> int:
        return self.num_heads // self.num_groups

    def to_megatron(self, hf):
        q, k, v = hf
        tail = q.shape[1:]  # (in,) for weights, () for biases
        g, d = self.num_groups, self.head_dim
        q = q.reshape(g, self._per_group * d, *tail)
        k = k.reshape(g, d, *tail)
        v = v.reshape(g, d, *tail)
        return torch.cat([q, k, v], dim=1).reshape(-1, *tail)

    def to_hf(self, tensor):
        tail = tensor.shape[1:]
        g, d = self.num_groups, self.head_dim
        grouped = tensor.reshape(g, (self._per_group + 2) * d, *tail)
        q, k, v = torch.split(grouped, [self._per_group * d, d, d], dim=1)
        return [q.reshape(-1, *tail).contiguous(), k.reshape(-1, *tail).contiguous(), v.reshape(-1, *tail).contiguous()]

    def megatron_shape(self, hf_shapes):
        return (sum(s[0] for s in hf_shapes), *hf_shapes[0][1:])


@dataclass(frozen=True)
class GateUpFuse(Transform):
    """SwiGLU ``gate_proj`` and ``up_proj`` <-> megatron's ``linear_fc1`` = ``[gate; up]``."""

    arity = 2

    def to_megatron(self, hf):
        return torch.cat(hf, dim=0)

    def to_hf(self, tensor):
        gate, up = torch.chunk(tensor, 2, dim=0)
        return [gate.contiguous(), up.contiguous()]

    def megatron_shape(self, hf_shapes):
        return (hf_shapes[0][0] + hf_shapes[1][0], *hf_shapes[0][1:])


@dataclass(frozen=True)
class VocabPad(Transform):
    """Embedding / LM-head rows: megatron pads the vocabulary with zero rows (see
    ``model.builder.padded_vocab_size``); export drops them again."""

    vocab_size: int
    padded_size: int

    def to_megatron(self, hf):
        (t,) = hf
        if self.padded_size == self.vocab_size:
            return t
        pad = t.new_zeros((self.padded_size - self.vocab_size, *t.shape[1:]))
        return torch.cat([t, pad], dim=0)

    def to_hf(self, tensor):
        return [tensor[: self.vocab_size].contiguous()]

    def megatron_shape(self, hf_shapes):
        return (self.padded_size, *hf_shapes[0][1:])
