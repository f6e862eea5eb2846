"""Validation loss (``val/loss``) every ``train.eval_interval`` steps and at the last step."""

from __future__ import annotations

import numpy as np
import torch
from megatron.core import parallel_state

from megatron_midtrain.callbacks.base import Callback
from megatron_midtrain.losses.ntp import NTPMethod
from megatron_midtrain.training.forward import forward_only, reduce_reports


def validation_forward(trainer, batches, index: int) -> float:
    """Mean token NLL of global batch ``index`` of ``batches`` (a forward-only pass; collective).

    Always plain NTP, whatever the method, so that runs of different methods compare.
    """
    cfg, method = trainer.cfg, NTPMethod()
    tp_group = parallel_state.get_tensor_model_parallel_group()

    def score(batch, logits):
        loss_sum, num_tokens, _ = method.loss(logits, batch["labels"], batch["loss_mask"], batch, tp_group)
        return {"loss": torch.stack([loss_sum.double(), num_tokens.double()])}

    outs = forward_only(trainer.model, batches.iterator(index), batches.num_microbatches, score,
                        seq_length=cfg.data.seq_length, micro_batch_size=cfg.train.micro_batch_size, device=trainer.device)
    return reduce_reports(outs, trainer.layout.dp, trainer.layout.pp)["loss"]


def validation_loss(trainer) -> float:
    """Mean of :func:`validation_forward` over ``train.eval_batches`` validation batches (NaN without a
    validation split), with the model in eval mode. Collective."""
    if trainer.valid_batches is None:
        return float("nan")
    trainer.model.eval()
    totals = [validation_forward(trainer, trainer.valid_batches, i) for i in range(trainer.cfg.train.eval_batches)]
    trainer.model.train()
    return float(np.mean(totals))


class ValidationLoss(Callback):
    """Adds ``val/loss`` to the record at every ``interval``-th step and at ``max_steps`` (0: never)."""

    def __init__(self, interval: int, max_steps: int):
        self.interval = interval
        self.max_steps = max_steps

    def on_step_end(self, trainer, record: dict) -> None:
        step = record["step"]
        if self.interval and (step % self.interval == 0 or step == self.max_steps):
            record["val/loss"] = validation_loss(trainer)
