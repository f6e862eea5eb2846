"""vocab_parallel_logprobs against a plain full-vocabulary log_softmax + gather.

Covers values and gradients (random upstream gradient), several chunk sizes
including a ragged last chunk, 3-D and non-contiguous logits, targets on the
shard boundaries, and a real 2-rank gloo run where each rank holds half of the
vocabulary.
"""

import pytest
import torch

from megatron_midtrain.losses.vocab_parallel import vocab_parallel_logprobs
from megatron_midtrain.testing.distributed import run_distributed

TOL = dict(rtol=1e-6, atol=1e-6)
VOCAB = 40  # two shards of 20
WORLD = 2


def _reference(logits: torch.Tensor, target: torch.Tensor, grad_out: torch.Tensor):
    """log p(target) and d(sum(grad_out * logp))/d logits with autograd on the full vocabulary."""
    x = logits.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(x.float(), dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    logp.backward(grad_out)
    return logp.detach(), x.grad.detach()


def _ours(logits: torch.Tensor, target: torch.Tensor, grad_out: torch.Tensor, group=None, chunk=3):
    x = logits.detach().clone().requires_grad_(True)
    logp = vocab_parallel_logprobs(x, target, group, chunk=chunk)
    logp.backward(grad_out)
    return logp.detach(), x.grad.detach()


def _inputs(shape, vocab=VOCAB, seed=0):
    """Random logits (with a large spread, to exercise the max-subtraction) and targets that
    include the first and last id of each half of the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, vocab, generator=gen) * 4.0
    target = torch.randint(0, vocab, shape, generator=gen)
    half = vocab // WORLD
    boundary = torch.tensor([0, half - 1, half, vocab - 1])
    flat = target.view(-1)
    flat[: boundary.numel()] = boundary
    grad_out = torch.randn(*shape, generator=gen)
    return logits, target, grad_out


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 4096])
def test_matches_log_softmax_single_process(chunk):
    # 2 x 5 = 10 positions: chunk 3 and 4 leave a ragged last chunk, 4096 is one chunk.
    logits, target, grad_out = _inputs((2, 5))
    ref_logp, ref_grad = _reference(logits, target, grad_out)
    logp, grad = _ours(logits, target, grad_out, chunk=chunk)
    assert logp.dtype == torch.float32 and logp.shape == target.shape
    torch.testing.assert_close(logp, ref_logp, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)


def test_float64_logits_stay_float64():
    # The fp64 parity cells (tests/test_grad_parity.py) need log-probs and gradients in fp64:
    # an fp32 pass would put fp32 rounding back into every fp64 gradient.
    logits, target, grad_out = _inputs((2, 5))
    logits, grad_out = logits.double(), grad_out.double()
    x = logits.clone().requires_grad_(True)
    ref = torch.log_softmax(x, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    ref.backward(grad_out)
    logp, grad = _ours(logits, target, grad_out)
    assert logp.dtype == grad.dtype == torch.float64
    torch.testing.assert_close(logp, ref.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(grad, x.grad, rtol=1e-13, atol=1e-13)


def test_two_dimensional_logits():
    logits, target, grad_out = _inputs((11,))
    ref_logp, ref_grad = _reference(logits, target, grad_out)
    logp, grad = _ours(logits, target, grad_out, chunk=3)
    torch.testing.assert_close(logp, ref_logp, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)


def test_non_contiguous_logits():
    # megatron produces [s, b, v]; a transposed view to [b, s, v] is not contiguous.
    logits_sbv, _, _ = _inputs((6, 3), seed=1)
    logits = logits_sbv.transpose(0, 1)
    assert not logits.is_contiguous()
    gen = torch.Generator().manual_seed(2)
    target = torch.randint(0, VOCAB, (3, 6), generator=gen)
    grad_out = torch.randn(3, 6, generator=gen)

    x = logits.detach().requires_grad_(True)  # keep the non-contiguous layout for the leaf
    logp = vocab_parallel_logprobs(x, target, None, chunk=4)
    logp.backward(grad_out)
    ref_logp, ref_grad = _reference(logits.contiguous(), target, grad_out)
    torch.testing.assert_close(logp.detach(), ref_logp, **TOL)
    torch.testing.assert_close(x.grad, ref_grad, **TOL)

    # A vocab slice of a wider tensor is non-contiguous along the rows as well.
    wide = torch.randn(3, 6, VOCAB + 8, generator=gen)
    sliced = wide[..., 4 : 4 + VOCAB]
    assert not sliced.is_contiguous()
    ref_logp, ref_grad = _reference(sliced.contiguous(), target, grad_out)
    logp, grad = _ours(sliced, target, grad_out, chunk=5)
    torch.testing.assert_close(logp, ref_logp, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)


def test_extreme_logits_are_finite():
    # A naive exp() would overflow; the global-max shift must keep everything finite.
    logits, target, grad_out = _inputs((2, 4), seed=3)
    logits = logits * 100.0 + 1000.0
    ref_logp, ref_grad = _reference(logits, target, grad_out)
    logp, grad = _ours(logits, target, grad_out, chunk=3)
    assert torch.isfinite(logp).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


def _vocab_shard_rank(group_kind: str, chunk: int):
    """One rank: compute on its half of the vocabulary; return (logp, shard grad, reference)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if group_kind == "megatron":
        from megatron.core import parallel_state

        from megatron_midtrain.utils import cpu_compat

        cpu_compat.activate()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=WORLD)
        group = parallel_state.get_tensor_model_parallel_group()
    else:
        group = dist.group.WORLD
    half = VOCAB // WORLD
    out = []
    # 3-D [b, s, v] and 2-D inputs; same seed on both ranks, so both see the same full logits.
    for shape, seed in (((2, 7), 10), ((9,), 11)):
        logits, target, grad_out = _inputs(shape, seed=seed)
        shard = logits[..., rank * half : (rank + 1) * half]  # a non-contiguous view, like a TP shard
        logp, grad = _ours(shard, target, grad_out, group=group, chunk=chunk)
        ref_logp, ref_grad = _reference(logits, target, grad_out)
        # numpy, not tensors: torch's multiprocessing queue would pass tensors through shared
        # memory that disappears when this process exits (see the report on run_distributed).
        out.append(tuple(t.numpy() for t in (logp, grad, ref_logp, ref_grad[..., rank * half : (rank + 1) * half])))
    if group_kind == "megatron":
        parallel_state.destroy_model_parallel()
    return out


@pytest.mark.parametrize("group_kind,chunk", [("world", 3), ("megatron", 4096)])
def test_two_ranks_match_full_vocabulary(group_kind, chunk):
    results = run_distributed(_vocab_shard_rank, WORLD, group_kind, chunk)
    for rank, per_shape in enumerate(results):
        for arrays in per_shape:
            logp, grad, ref_logp, ref_grad = (torch.from_numpy(a) for a in arrays)
            torch.testing.assert_close(logp, ref_logp, **TOL, msg=lambda m: f"rank {rank} logp: {m}")
            torch.testing.assert_close(grad, ref_grad, **TOL, msg=lambda m: f"rank {rank} grad: {m}")
    # Both ranks must agree on the (all-reduced) log-probs exactly.
    for a, b in zip(results[0], results[1]):
        assert (a[0] == b[0]).all()
