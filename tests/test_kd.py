"""KD: vocab-parallel soft cross-entropy against torch, and method=kd under TP/PP/DP."""

import pytest
import torch

from megatron_midtrain.losses.kd import vocab_parallel_soft_cross_entropy
from megatron_midtrain.testing.distributed import run_distributed


def _reference(student, teacher, temperature):
    p = torch.softmax(teacher / temperature, -1)
    ce = -(p * torch.log_softmax(student / temperature, -1)).sum(-1)
    ent = -(p * torch.log_softmax(teacher / temperature, -1)).sum(-1)
    return ce, ent


@pytest.mark.parametrize("temperature,chunk", [(1.0, 4096), (2.0, 3)])
def test_soft_ce_matches_torch(temperature, chunk):
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(2, 5, 11, generator=g) * 3).requires_grad_()
    teacher = torch.randn(2, 5, 11, generator=g) * 3
    upstream = torch.randn(2, 5, generator=g)
    ce, ent = vocab_parallel_soft_cross_entropy(student, teacher, temperature, None, chunk)
    want_ce, want_ent = _reference(student, teacher, temperature)
    torch.testing.assert_close(ce, want_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad((ce * upstream).sum(), student)
    (want,) = torch.autograd.grad((want_ce * upstream).sum(), student)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)


def _sharded(temperature):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(1)
    student_full = torch.randn(3, 4, 10, generator=g) * 2
    teacher_full = torch.randn(3, 4, 10, generator=g) * 2
    upstream = torch.randn(3, 4, generator=g)
    shard = slice(rank * 5, (rank + 1) * 5)
    student = student_full[..., shard].clone().requires_grad_()
    ce, ent = vocab_parallel_soft_cross_entropy(student, teacher_full[..., shard], temperature, dist.group.WORLD)
    (grad,) = torch.autograd.grad((ce * upstream).sum(), student)
    full = student_full.clone().requires_grad_()
    want_ce, want_ent = _reference(full, teacher_full, temperature)
    (want_grad,) = torch.autograd.grad((want_ce * upstream).sum(), full)
    return [(ce - want_ce).abs().max().item(), (ent - want_ent).abs().max().item(), (grad - want_grad[..., shard]).abs().max().item()]


def test_soft_ce_vocab_parallel_two_ranks():
    for errors in run_distributed(_sharded, 2, 1.5):
        assert max(errors) < 1e-5, errors


@pytest.mark.parametrize("layout", ["tp2pp2", "dp2"])
def test_kd_is_layout_invariant(layout, layout_runs):
    baseline, records = layout_runs("tp1")[("llama", "kd")]["records"], layout_runs(layout)[("llama", "kd")]["records"]
    assert [r["step"] for r in records] == [r["step"] for r in baseline] == list(range(1, 4))
    for ref, got in zip(baseline, records):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), ref["step"]
        assert got["kd/kl"] == pytest.approx(ref["kd/kl"], rel=1e-4)
    assert all(r["kd/kl"] > 0 for r in baseline)
    # distillation pulls the student towards the teacher
    assert baseline[-1]["kd/kl"] < baseline[0]["kd/kl"]
