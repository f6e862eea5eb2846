"""The TP1 generation shortcuts (model/tp1_inference.py) are scoped, exact and refuse misuse."""

import pytest
import torch
from megatron.core.tensor_parallel import layers

from megatron_midtrain.model.tp1_inference import _IDENTITY_MAPPINGS, _LINEARS, _linear, tp1_linear_shortcuts

NAMES = _IDENTITY_MAPPINGS + _LINEARS


def test_swapped_only_inside_the_block_and_restored_after_an_error():
    before = {n: getattr(layers, n) for n in NAMES}
    with torch.no_grad():
        with pytest.raises(ValueError):
            with tp1_linear_shortcuts(1, False):
                assert all(getattr(layers, n) is not before[n] for n in NAMES)
                raise ValueError("boom")
    assert all(getattr(layers, n) is before[n] for n in NAMES)


def test_no_op_at_tp2_or_with_sequence_parallelism_and_refused_with_gradients_on():
    before = {n: getattr(layers, n) for n in NAMES}
    with torch.no_grad():
        for tp, sp in ((2, False), (1, True)):
            with tp1_linear_shortcuts(tp, sp):
                assert all(getattr(layers, n) is before[n] for n in NAMES)
    with pytest.raises(RuntimeError, match="gradients off"):
        with tp1_linear_shortcuts(1, False):
            pass


def test_linear_shortcut_is_bitwise_the_matmul_megatron_runs():
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 5, 16, generator=gen), torch.randn(8, 16, generator=gen), torch.randn(8, generator=gen)
    assert torch.equal(_linear(x, w, b), torch.matmul(x, w.t()) + b)
    assert torch.equal(_linear(x, w, None), torch.matmul(x, w.t()))
