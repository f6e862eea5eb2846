"""The step of a method trained on corpus batches (ntp, remit, rho1, kd).

1. each input the method declares (``method.inputs``, see :mod:`megatron_midtrain.training.inputs`)
   adds its per-micro-batch tensors (reference log-probs, reference hidden states, a selection);
2. megatron's schedule runs forward/backward over the step's micro-batches; on the last stage
   ``method.loss`` returns ``(loss_sum, num_tokens, report)``;
3. the gradients are reduced over DP and divided by the global token count
   (``calculate_per_token_loss``), so the objective is sum / tokens over the global batch.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_midtrain.errors import UserError
from megatron_midtrain.training.forward import finalize_gradients, forward_only, method_loss_fn, reduce_reports, run_schedule
from megatron_midtrain.training.inputs import INPUTS
from megatron_midtrain.training.step import StepResult


class CorpusStep:
    """``forward_backward(step)`` for a corpus method; also the forward-only pass its inputs use."""

    def __init__(self, trainer):
        self.method = trainer.method
        self.model = trainer.model
        self.reference = trainer.reference
        self.device = trainer.device
        self.layout = trainer.layout
        self.batches = trainer.train_batches
        self.seq_length = trainer.cfg.data.seq_length
        self.micro_batch_size = trainer.cfg.train.micro_batch_size
        self.tokens_per_step = trainer.cfg.train.global_batch_tokens
        unknown = [name for name in getattr(self.method, "inputs", ()) if name not in INPUTS]
        if unknown:
            raise UserError(f"method={trainer.cfg.method.name} declares unknown inputs {unknown}",
                            f"use inputs from megatron_midtrain.training.inputs: {', '.join(INPUTS)}")
        self.inputs = [INPUTS[name] for name in getattr(self.method, "inputs", ())]

    def forward_only(self, micro_batches, num_microbatches: int, score_fn) -> list:
        """:func:`~megatron_midtrain.training.forward.forward_only` on the policy with this run's shapes."""
        return forward_only(self.model, micro_batches, num_microbatches, score_fn, seq_length=self.seq_length,
                            micro_batch_size=self.micro_batch_size, device=self.device)

    def forward_backward(self, step: int):
        batches, index = self.batches, step - 1
        extras = [{} for _ in range(batches.num_microbatches)]
        for provide in self.inputs:
            provide(self, batches, index, extras)
        total_tokens = torch.zeros([], dtype=torch.int, device=self.device)
        method_loss = method_loss_fn(self.method, parallel_state.get_tensor_model_parallel_group())

        def loss_fn(batch, logits):
            nonlocal total_tokens
            out = method_loss(batch, logits)
            total_tokens += out[1]  # the global token count the gradients are divided by
            return out

        micro_batches = (dict(batch, **extra) for batch, extra in zip(batches.iterator(index), extras))
        reports = run_schedule(self.model, micro_batches, batches.num_microbatches, loss_fn, seq_length=self.seq_length,
                               micro_batch_size=self.micro_batch_size, device=self.device)
        finalize_gradients(self.model, total_tokens)
        report = self.method.finalize_report(reduce_reports(reports, self.layout.dp, self.layout.pp))
        loss = report.pop("loss")
        return StepResult(loss=loss, metrics=report, tokens=self.tokens_per_step)

    def finish_record(self, record: dict) -> None:
        """Nothing to add: every corpus figure is known after the backward pass."""
