"""Plain-tensor shortcuts for megatron's tensor-parallel linears while generating at TP1.

Every ``ColumnParallelLinear`` / ``RowParallelLinear`` (and the vocabulary-parallel embedding)
wraps its matmul in ``torch.autograd.Function``\\ s: the TP "region" mappings
(``copy_to`` / ``reduce_from`` / ``gather_from_tensor_model_parallel_region``) and the linear
itself (``LinearWithFrozenWeight`` or ``LinearWithGradAccumulationAndAsyncCommunication``), each
call looking its TP group up again. With one TP rank the mappings are identities and the linear
is ``torch.matmul(input, weight.t())`` (+ bias), but the wrappers still cost Python and autograd
bookkeeping per call, even under ``torch.no_grad``: on the CPU demo, a decode step is a few small
matmuls per layer, and that overhead was ~20% of a KV-cache ``generate``.

:func:`tp1_linear_shortcuts` swaps those module-level functions in
``megatron.core.tensor_parallel.layers`` (where the linears look them up at call time) for the
plain computation they perform at TP1, for the duration of a ``with`` block, and puts megatron's
back on exit. The shortcut forwards run the very same ops (the same ``matmul`` of the same
tensors, then the same bias add), so the outputs are bit-identical; they do not build autograd
graphs, so the block refuses to start with gradients enabled. With more than one TP rank, or
sequence parallelism on, it changes nothing (the mappings are real collectives there).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from megatron.core.tensor_parallel import layers

#: megatron's region mappings that are identities at TP1 (forward), as named in ``layers``.
_IDENTITY_MAPPINGS = ("copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
                      "gather_from_tensor_model_parallel_region", "scatter_to_tensor_model_parallel_region")
#: megatron's linear implementations, both ``matmul(input, weight.t()) (+ bias)`` in the forward.
_LINEARS = ("linear_with_frozen_weight", "linear_with_grad_accumulation_and_async_allreduce")


def _identity(input_, group=None):
    return input_


def _linear(input, weight, bias, gradient_accumulation_fusion=False, allreduce_dgrad=False, sequence_parallel=False,
            tp_group=None, grad_output_buffer=None, wgrad_deferral_limit=None, **unused):
    """The forward of megatron's linear Functions without sequence parallelism (same ops, same order)."""
    if sequence_parallel:  # only reachable if a module kept SP on: never silently skip its all-gather
        raise RuntimeError("tp1_linear_shortcuts: a linear runs with sequence parallelism")
    output = torch.matmul(input, weight.t())
    if bias is not None:
        output = output + bias
    return output


@contextlib.contextmanager
def tp1_linear_shortcuts(tp_size: int, sequence_parallel: bool) -> Iterator[None]:
    """Inside the block, megatron's TP linears run as plain tensor ops (module docstring).

    A no-op unless ``tp_size == 1`` and ``sequence_parallel`` is off. Gradients must be off
    (``torch.no_grad`` / ``torch.inference_mode``): the shortcuts record no backward.
    """
    if tp_size != 1 or sequence_parallel:
        yield
        return
    if torch.is_grad_enabled():
        raise RuntimeError("tp1_linear_shortcuts needs gradients off (torch.no_grad)")
    names = _IDENTITY_MAPPINGS + _LINEARS
    saved = {name: getattr(layers, name) for name in names}
    try:
        for name in _IDENTITY_MAPPINGS:
            setattr(layers, name, _identity)
        for name in _LINEARS:
            setattr(layers, name, _linear)
        yield
    finally:
        for name, fn in saved.items():
            setattr(layers, name, fn)
