"""Test-only callbacks: fault injection and gradient capture, passed as ``Trainer(cfg, callbacks=[...])``."""

from __future__ import annotations

import torch

from megatron_midtrain.callbacks.base import Callback


class InjectNonFinite(Callback):
    """Makes the training forward of the given steps produce NaN (the model's output is
    multiplied by NaN while gradients are enabled, so generation and forward-only passes stay
    finite), to exercise the non-finite guard."""

    def __init__(self, steps):
        self.steps = set(steps)
        self._handle = None

    def on_step_start(self, trainer, step: int) -> None:
        if step in self.steps:
            self._handle = trainer.model.module.register_forward_hook(
                lambda module, args, output: output * float("nan") if torch.is_grad_enabled() else output)

    def on_step_end(self, trainer, record: dict) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class CaptureGradients(Callback):
    """Gathers every parameter's full gradient right after the given steps
    (:func:`megatron_midtrain.testing.grads.full_gradients`); ``captured[step]`` holds them."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.captured = {}

    def on_step_end(self, trainer, record: dict) -> None:
        from megatron_midtrain.testing.grads import full_gradients

        if record["step"] in self.steps:
            # After the step the buffers still hold its (reduced, clipped) gradients.
            self.captured[record["step"]] = full_gradients([trainer.model])
