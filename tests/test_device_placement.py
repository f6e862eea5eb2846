"""Device placement, proved on the CPU: every tensor a loss reads lives on the logits' device.

On the CPU every tensor is a CPU tensor, so a missing ``.to(device)`` only shows up on the
first GPU run ("Expected all tensors to be on the same device"). Here the model's output
(and the trainer's device) is PyTorch's ``meta`` device while the micro-batches and the
method extras are built by the same functions the data path uses, on the CPU. ``meta``
follows CUDA's mixing rule (a CPU tensor meets it only as a 0-d scalar), so any CPU tensor
that reaches a loss unmoved raises "Tensor on device cpu is not on the expected device
meta" here, as it would on a GPU. Each closure is called the way megatron's schedule calls
it (:func:`megatron_midtrain.training.forward._forward_step` then the returned loss
function), and the loss is back-propagated.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from megatron.core import parallel_state

from megatron_midtrain.config import schema
from megatron_midtrain.losses import build_method
from megatron_midtrain.losses.ntp import NTPMethod
from megatron_midtrain.losses.vocab_parallel import label_logprobs
from megatron_midtrain.rl.grpo import grpo_advantages
from megatron_midtrain.rl.losses import GRPOLoss
from megatron_midtrain.rl.rollout_batches import attach_ntp_inputs, attach_rollout_inputs, rollout_micro_batches
from megatron_midtrain.rl.tasks import Prompt, rl_masks_from_positions
from megatron_midtrain.training.data import collate
from megatron_midtrain.training.forward import _forward_step, _score_only, method_loss_fn

META = torch.device("meta")
MBS, SEQ, VOCAB, HIDDEN, EOD = 2, 16, 32, 8, 0


@pytest.fixture(autouse=True)
def _no_model_parallel(monkeypatch):
    """The closures ask megatron for the TP group; a single-rank run has none."""
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_group", lambda *a, **k: None)


class MetaModel:
    """Stands in for the GPT stage: checks its inputs' device, returns meta logits."""

    def __init__(self, width: int = VOCAB):
        self.width = width
        self.outputs = []

    def __call__(self, tokens, position_ids, attention_mask):
        for name, t in (("tokens", tokens), ("position_ids", position_ids), ("attention_mask", attention_mask)):
            if t is not None:
                assert t.device == META, f"{name} reached the model on {t.device}"
        out = torch.empty(*tokens.shape, self.width, device=META, requires_grad=True)
        self.outputs.append(out)
        return out


def corpus_micro_batch(rng: np.random.Generator, reset_attention_mask: bool = False) -> dict:
    """A micro-batch as StepBatches yields it: collated CPU samples plus their sample ids."""
    samples = []
    for _ in range(MBS):
        seq = rng.integers(1, VOCAB, SEQ + 1)
        seq[SEQ // 2] = EOD
        sample = {
            "tokens": torch.from_numpy(seq[:-1]),
            "labels": torch.from_numpy(seq[1:]),
            "loss_mask": torch.ones(SEQ, dtype=torch.float32),
            "position_ids": torch.arange(SEQ),
        }
        if reset_attention_mask:
            sample["attention_mask"] = torch.tril(torch.ones(1, SEQ, SEQ)) < 0.5
        samples.append(sample)
    batch = collate(samples)
    batch["sample_ids"] = torch.arange(MBS)
    return batch


def run_closure(method, batch: dict, width: int = VOCAB):
    """``_forward_step`` + the loss function it returns, as megatron's schedule runs them."""
    model = MetaModel(width)
    output, loss_fn = _forward_step(META, method_loss_fn(method, None), iter([batch]), model)
    loss_sum, num_tokens, report = loss_fn(output)
    for name, t in [("loss_sum", loss_sum), ("num_tokens", num_tokens)] + [(k, v) for k, v in report.items() if torch.is_tensor(v)]:
        assert t.device == META, f"{name} is on {t.device}"
    if loss_sum.requires_grad:
        loss_sum.backward()
        assert model.outputs[0].grad is not None and model.outputs[0].grad.device == META
    return report


def run_forward_only(score_fn, batch: dict, width: int = VOCAB):
    """One micro-batch of :func:`~megatron_midtrain.training.forward.forward_only`'s closure."""
    model = MetaModel(width)
    output, collect = _forward_step(META, partial(_score_only, score_fn), iter([batch]), model)
    return collect(output, non_loss_data=True)


def meta_reference_logprobs() -> torch.Tensor:
    """What the co-located reference's last stage returns per micro-batch (its forward ran on the device)."""
    return run_forward_only(label_logprobs, corpus_micro_batch(np.random.default_rng(1)))


def test_reference_pass_keeps_everything_on_the_device():
    assert meta_reference_logprobs().device == META


@pytest.mark.parametrize("method_cfg", [
    schema.NTPMethodConfig(),
    schema.ReMiTMethodConfig(),
    schema.ReMiTMethodConfig(center="document"),
    schema.Rho1MethodConfig(scope="microbatch"),
], ids=["ntp", "remit", "remit-document", "rho1-microbatch"])
def test_corpus_method_losses_read_only_device_tensors(method_cfg):
    method = build_method(method_cfg, eod_id=EOD)
    batch = corpus_micro_batch(np.random.default_rng(0))
    if method.needs_reference == "target_logprobs":
        batch["ref_logprobs"] = meta_reference_logprobs()
    report = run_closure(method, batch)
    assert "ntp_loss" in report


def test_reset_attention_mask_reaches_the_model_on_the_device():
    run_closure(NTPMethod(), corpus_micro_batch(np.random.default_rng(0), reset_attention_mask=True))


def test_rho1_global_selection_and_loss_stay_on_the_device():
    method = build_method(schema.Rho1MethodConfig(scope="global"))
    batches = [corpus_micro_batch(np.random.default_rng(s)) for s in range(2)]
    scores = []
    for b in batches:  # the forward-only pre-pass
        b["ref_logprobs"] = meta_reference_logprobs()
        scores.append(run_forward_only(lambda batch, logits: method.score(logits, batch["labels"], batch["loss_mask"], batch, None), b))
    assert all(s.device == META for s in scores)
    # The global top-k needs values (meta has none): select on real scores; the keep masks
    # then travel with the micro-batch like any other data-path tensor.
    masks = [b["loss_mask"] for b in batches]
    selected = method.select([torch.randn(s.shape) for s in scores], masks, None)
    for b, sel in zip(batches, selected):
        b.update(sel)
        run_closure(method, b)


def test_kd_loss_reads_only_device_tensors():
    method = build_method(schema.KDMethodConfig(alpha=0.5))
    batch = corpus_micro_batch(np.random.default_rng(0))
    head = torch.empty(VOCAB, HIDDEN, device=META)
    batch["ref_hidden"] = torch.empty(MBS, SEQ, HIDDEN, device=META)
    batch["ref_logits_fn"] = lambda hidden: hidden @ head.t()
    run_closure(method, batch)


def rollout_batches(group_size: int = 2) -> list[dict]:
    """Rollout micro-batches built by the RL trainer's own functions (CPU), with old log-probs
    from the forward-only pass (on the device), as in ``RolloutStep.forward_backward``."""
    prompts = [Prompt(ids=[1, 2, 3]), Prompt(ids=[4, 5])]
    responses = [[6, 7], [8], [9, 10, 11], [12, 13]]
    advantages = grpo_advantages(torch.tensor([1.0, 0.0, 0.5, 0.25], dtype=torch.float64), group_size)
    batches = rollout_micro_batches(prompts, responses, advantages, group_size, MBS, pad_id=EOD)
    old = [run_forward_only(label_logprobs, b) for b in batches]
    attach_rollout_inputs(batches, old, [None] * len(batches), agg_normalizer=7.0, drgrpo_constant=4.0)
    return batches


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_grpo_loss_reads_only_device_tensors(agg):
    loss = GRPOLoss(schema.GRPOMethodConfig(loss_agg=agg))
    for b in rollout_batches():
        report = run_closure(loss, b)
        assert "rl/pg_loss" in report


def test_rmt_ntp_term_reads_only_device_tensors():
    method = build_method(schema.RMTMethodConfig(ntp_weight=0.1))
    corpus = [corpus_micro_batch(np.random.default_rng(s)) for s in range(2)]
    rows, cols = np.array([0, 1, 3]), np.array([4, 9, 2])
    masks = rl_masks_from_positions((2 * MBS, SEQ), rows, cols, MBS)
    attach_ntp_inputs(corpus, masks, ntp_normalizer=50.0)
    for b in corpus:
        run_closure(method, b)
