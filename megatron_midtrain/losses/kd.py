"""KD baseline: forward KL from a frozen teacher (the reference) over the full vocabulary.

Per token, with temperature T, teacher p = softmax(z_ref / T), student q = softmax(z / T):

    CE_T = -sum_v p(v) log q(v)          (= KL(p || q) + H(p); same gradient as the KL)
    loss = alpha * T^2 * CE_T + (1 - alpha) * (-log q_1(target))      (q_1: T = 1)

Computed vocab-parallel from the two logits shards with two small all-reduces
(a packed MAX of both shard maxima, then a packed SUM of [sum exp_student,
sum exp_teacher, sum exp_teacher * z/T, sum exp_teacher * z_ref/T]), never
gathering the vocabulary; the backward recomputes softmaxes chunk by chunk:
d CE_T / d z = (q - p) / T.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_midtrain.losses.base import register_method, report_entry
from megatron_midtrain.losses.vocab_parallel import DEFAULT_CHUNK, _all_reduce, vocab_parallel_logprobs


class _VocabParallelSoftCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature, group, chunk):
        s = student.reshape(-1, student.shape[-1])
        t = teacher.reshape(-1, teacher.shape[-1])
        n = s.shape[0]
        inv_t = 1.0 / temperature
        maxes = torch.empty(n, 2, dtype=torch.float32, device=s.device)
        for a in range(0, n, chunk):
            maxes[a : a + chunk, 0] = s[a : a + chunk].float().amax(-1) * inv_t
            maxes[a : a + chunk, 1] = t[a : a + chunk].float().amax(-1) * inv_t
        maxes = _all_reduce(maxes, dist.ReduceOp.MAX, group)
        sums = torch.empty(n, 4, dtype=torch.float32, device=s.device)
        for a in range(0, n, chunk):
            zs = s[a : a + chunk].float() * inv_t
            zt = t[a : a + chunk].float() * inv_t
            et = (zt - maxes[a : a + chunk, 1:2]).exp()
            sums[a : a + chunk, 0] = (zs - maxes[a : a + chunk, 0:1]).exp().sum(-1)
            sums[a : a + chunk, 1] = et.sum(-1)
            sums[a : a + chunk, 2] = (et * zs).sum(-1)
            sums[a : a + chunk, 3] = (et * zt).sum(-1)
        sums = _all_reduce(sums, dist.ReduceOp.SUM, group)
        lse_s = maxes[:, 0] + sums[:, 0].log()
        lse_t = maxes[:, 1] + sums[:, 1].log()
        ce = lse_s - sums[:, 2] / sums[:, 1]  # -sum_v p log q
        entropy = lse_t - sums[:, 3] / sums[:, 1]  # H(p)
        ctx.save_for_backward(student, teacher, lse_s, lse_t)
        ctx.inv_t, ctx.chunk = inv_t, chunk
        ctx.mark_non_differentiable(entropy)
        return ce.view(student.shape[:-1]), entropy.view(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_ce, grad_entropy):  # noqa: ARG004 - the entropy is not differentiable
        student, teacher, lse_s, lse_t = ctx.saved_tensors
        s = student.reshape(-1, student.shape[-1])
        t = teacher.reshape(-1, teacher.shape[-1])
        g = grad_ce.reshape(-1).float()
        grad = torch.empty_like(s)
        for a in range(0, s.shape[0], ctx.chunk):
            b = a + ctx.chunk
            q = (s[a:b].float() * ctx.inv_t - lse_s[a:b, None]).exp()
            p = (t[a:b].float() * ctx.inv_t - lse_t[a:b, None]).exp()
            grad[a:b] = ((q - p) * (g[a:b, None] * ctx.inv_t)).to(grad.dtype)
        return grad.view_as(student), None, None, None, None


def vocab_parallel_soft_cross_entropy(student_logits, teacher_logits, temperature: float = 1.0, group=None, chunk: int = DEFAULT_CHUNK):
    """(CE_T per token, teacher entropy per token) from vocab shards; differentiable w.r.t. the student."""
    return _VocabParallelSoftCE.apply(student_logits, teacher_logits.detach(), float(temperature), group, chunk)


@register_method("kd")
class KDMethod:
    needs_reference = "logits"
    inputs = ("reference_hidden",)

    def __init__(self, cfg, **context):
        self.temperature = float(cfg.temperature)
        self.alpha = float(cfg.alpha)

    def loss(self, logits, labels, loss_mask, extras, tp_group):
        teacher = extras["ref_logits_fn"](extras["ref_hidden"])
        ce, ent = vocab_parallel_soft_cross_entropy(logits, teacher, self.temperature, tp_group)
        mask = loss_mask.bool()
        per_token = self.alpha * self.temperature**2 * ce
        logp = None
        if self.alpha < 1.0:
            logp = vocab_parallel_logprobs(logits, labels, tp_group)
            per_token = per_token - (1.0 - self.alpha) * logp
        count = mask.sum().to(torch.int)
        report = {
            "kd/ce": report_entry((ce.detach() * mask).sum(), count),
            "kd/kl": report_entry(((ce.detach() - ent) * mask).sum(), count),
        }
        if logp is not None:
            report["ntp_loss"] = report_entry(-(logp.detach() * mask).sum(), count)
        return (per_token * mask).sum(), count, report

    def finalize_report(self, report):
        return report
