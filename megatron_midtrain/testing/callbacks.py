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
    """Gathers every parameter's full gradient (with ``params``: its value) right after the given
    steps (:func:`megatron_midtrain.testing.grads.full_gradients`); ``captured[step]`` holds them."""

    def __init__(self, steps, params: bool = False):
        self.steps = set(steps)
        self.params = params
        self.captured = {}

    def on_step_end(self, trainer, record: dict) -> None:
        from megatron_midtrain.testing.grads import full_gradients

        if record["step"] in self.steps:
            # After the step the buffers still hold its (reduced, clipped) gradients.
            self.captured[record["step"]] = full_gradients([trainer.model], params=self.params)


class NudgeWeights(Callback):
    """Moves every parameter by one ulp before the first step: a third of the elements up, a
    third down, a third untouched (seeded). A rounding-sized perturbation of the same model at
    the same layout, so a run with it measures how far fp32 rounding alone carries a run: the
    rounding floor the layout-parity tests compare later steps against."""

    def __init__(self, seed: int = 1234):
        self.seed = seed

    def on_train_start(self, trainer) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for param in trainer.model.parameters():
                direction = torch.randint(-1, 2, tuple(param.shape), generator=gen).to(param.device, param.dtype)
                nudged = torch.nextafter(param.data, param.data + direction)
                param.data.copy_(torch.where(direction == 0, param.data, nudged))


class ScaleAdamMoments(Callback):
    """A deliberate optimizer-state defect, for proving that the parity tests can fail at step 3:
    after step ``step``, the ranks of tensor-parallel rank ``tp_rank`` multiply their Adam first
    moments by ``factor`` (as a shard's state restored or reduced wrongly would). Step ``step``'s
    gradients are untouched; only later steps see it."""

    def __init__(self, step: int = 1, factor: float = 0.99, tp_rank: int = 1):
        self.step, self.factor, self.tp_rank = step, factor, tp_rank

    def on_step_end(self, trainer, record: dict) -> None:
        from megatron.core import parallel_state

        if record["step"] != self.step or parallel_state.get_tensor_model_parallel_rank() != self.tp_rank:
            return
        chained = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
        moments = [state["exp_avg"] for opt in chained for state in opt.optimizer.state.values() if "exp_avg" in state]
        if not moments:
            raise RuntimeError("ScaleAdamMoments found no Adam moments to change")
        for moment in moments:
            moment.mul_(self.factor)
