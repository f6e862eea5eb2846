"""The mid-training loop on megatron-core: build, (resume), train, close.

:class:`Trainer` builds the components (process groups, data, policy, reference, optimizer),
then runs a loop::

    for each step:  callbacks.on_step_start -> train_step -> callbacks.on_step_end

``train_step`` is ``forward_backward`` (what the *method* does around the model: its
:class:`Step`, e.g. reference scores then the schedule, or rollouts then the GRPO update)
followed by ``optimizer_step``. Everything else (validation, lm-eval, checkpoint cadence,
signal stop, metrics.jsonl/TensorBoard/progress, the plot, the non-finite guard, W&B, the
profiler) is a callback in :mod:`megatron_midtrain.callbacks`. See docs/architecture.md.
"""

from __future__ import annotations

import math
import time

from megatron.core import parallel_state

from megatron_midtrain.callbacks import default_callbacks
from megatron_midtrain.callbacks.base import Callback
from megatron_midtrain.callbacks.run_lock import RunLockGuard
from megatron_midtrain.data.tokenizer import tokenizer_fingerprint
from megatron_midtrain.errors import UserError
from megatron_midtrain.losses import build_method
from megatron_midtrain.training import checkpoint as ckpt
from megatron_midtrain.training import run_dir as rundir
from megatron_midtrain.training.components import build_optimizer, build_policy, build_reference
from megatron_midtrain.training.corpus_step import CorpusStep
from megatron_midtrain.training.data import StepBatches, build_data, prepare_sources
from megatron_midtrain.training.distributed import init_distributed, shutdown
from megatron_midtrain.training.run_lock import acquire_run_lock
from megatron_midtrain.training.step import Step, StepResult
from megatron_midtrain.training.runtime import default_device, log0, param_dtype, seed_everything


class Trainer:
    """``Trainer(cfg).train()``; ``callbacks`` are added to the configured ones (they run first)."""

    def __init__(self, cfg, callbacks: list[Callback] | None = None):
        """``cfg``: a validated :class:`MidtrainConfig` (see config/loader.py)."""
        self.cfg = cfg
        self.layout = init_distributed(cfg)
        self.rank0 = self.layout.rank == 0
        self.run_dir = rundir.choose_run_dir(cfg, self.rank0)
        # One live process per run dir: rank 0 takes <run dir>/run.lock before anything is
        # written there (every writer runs inside the Trainer's lifetime, so all sit behind it);
        # a run dir in use is refused on every rank. close() releases it.
        self.run_lock = acquire_run_lock(self.run_dir, cfg.run.lock_stale_s, self.rank0)
        self.lock_lost = False
        try:
            self._build(cfg, callbacks)
        except BaseException:
            if self.run_lock is not None:  # a failed start: no lock left, no empty run dir created
                self.run_lock.release(remove_created_dirs=True)
            raise

    def _build(self, cfg, callbacks: list[Callback] | None) -> None:
        seed_everything(cfg.run.seed)
        self.dtype = param_dtype(cfg)
        self.device = default_device()
        self.global_batch_size = self._global_batch_size()
        self.stop_reason: str | None = None

        # Validate everything that can be wrong with the inputs before the first write
        # to the run directory: a failed start leaves an existing run untouched.
        resume_meta = rundir.check_resumable(cfg, self.run_dir, self.rank0)
        sources = prepare_sources(cfg)
        self.tokenizer_id = tokenizer_fingerprint(sources[0])
        self.tokenizer_path = sources[0].path
        self.method = build_method(cfg.method, eod_id=sources[0].eod)
        if hasattr(self.method, "check_inputs"):
            self.method.check_inputs(cfg, self.layout, sources, self.tokenizer_id)
        method_callbacks = self.method.callbacks(cfg) if hasattr(self.method, "callbacks") else []
        # The lock guard first: a run that lost its lock stops before any writer sees the step.
        self.callbacks = [RunLockGuard()] + list(callbacks or []) + default_callbacks(cfg, method_callbacks)
        self.model, self.transformer_config = build_policy(cfg, self.dtype, self.layout)
        self.reference = build_reference(cfg, self.method, self.tokenizer_id, self.dtype, self.global_batch_size)
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model, self.transformer_config, self.dtype)
        rundir.write_run_config(cfg, self.run_dir, self.rank0)
        self.data = build_data(cfg, sources, self.global_batch_size)
        self.train_batches = self._step_batches(self.data.train)
        self.valid_batches = self._step_batches(self.data.valid) if self.data.valid is not None else None
        self.step = rundir.resume(cfg, resume_meta, self.model, self.optimizer, self.scheduler)
        self.method_step: Step = self.method.make_step(self) if hasattr(self.method, "make_step") else CorpusStep(self)

    def _global_batch_size(self) -> int:
        cfg, seq = self.cfg, self.cfg.data.seq_length
        if cfg.train.global_batch_tokens % seq:
            raise UserError(
                f"train.global_batch_tokens={cfg.train.global_batch_tokens} is not a multiple of data.seq_length={seq}",
                "make the global batch a whole number of sequences",
            )
        size = cfg.train.global_batch_tokens // seq
        per_step = cfg.train.micro_batch_size * self.layout.dp
        if size % per_step:
            raise UserError(
                f"global batch of {size} sequences is not divisible by micro_batch_size*DP = "
                f"{cfg.train.micro_batch_size}*{self.layout.dp}",
                "adjust train.global_batch_tokens or train.micro_batch_size",
            )
        return size

    def _step_batches(self, dataset) -> StepBatches:
        return StepBatches(dataset, self.global_batch_size, self.cfg.train.micro_batch_size,
                           parallel_state.get_data_parallel_rank(), self.layout.dp)

    # ------------------------------------------------------------------ one step
    def zero_grad(self) -> None:
        """Zero megatron's gradient buffers (and the optimizer's fp32 main grads)."""
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def forward_backward(self, step: int) -> StepResult:
        """Zero the gradient buffers and run the method's step (gradients reduced over DP)."""
        self.zero_grad()
        return self.method_step.forward_backward(step)

    def optimizer_step(self, loss: float) -> tuple[bool, float]:
        """One optimizer update of the gradients in the buffers, unless ``loss`` is non-finite;
        ``(skipped, grad_norm)``. The LR schedule counts optimizer updates and advances even on a
        skipped one, so the LR stays a function of the update count."""
        skipped = not math.isfinite(loss)
        grad_norm = float("nan")
        if not skipped:
            ok, grad_norm, _ = self.optimizer.step()
            skipped = not ok
        self.scheduler.step(increment=1)
        return skipped, float(grad_norm) if grad_norm is not None else float("nan")

    def train_step(self) -> dict:
        """One optimizer step; returns its metrics record."""
        step = self.step + 1
        start = time.perf_counter()
        result = self.forward_backward(step)
        if result.updates is None:
            skipped, grad_norm = self.optimizer_step(result.loss)
        else:  # the step took its own updates: any skipped one marks the step, the norm is their mean
            skipped = any(s for s, _ in result.updates)
            grad_norm = sum(g for _, g in result.updates) / len(result.updates)
        self.step = step
        elapsed = time.perf_counter() - start
        record = {
            "step": step,
            "loss": result.loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "tokens_per_s": result.tokens / elapsed,
            "consumed_tokens": step * self.cfg.train.global_batch_tokens,
            "step_time_s": elapsed,
        }
        if skipped:
            record["skipped"] = True
        record.update(result.metrics)
        self.method_step.finish_record(record)
        return record

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        max_steps = self.cfg.train.max_steps
        if self.step >= max_steps:
            log0(f"run {self.run_dir} already finished step {self.step} >= train.max_steps={max_steps}; "
                 "raise train.max_steps to continue")
            return
        log0(f"training steps {self.step + 1}..{max_steps}: {self.global_batch_size} sequences x "
             f"{self.cfg.data.seq_length} tokens per step, {self.train_batches.num_microbatches} micro-batches of "
             f"{self.cfg.train.micro_batch_size} per DP rank; run dir {self.run_dir}")
        self._dispatch("on_train_start")
        while self.step < max_steps and self.stop_reason is None:
            self._dispatch("on_step_start", self.step + 1)
            record = self.train_step()
            self._dispatch("on_step_end", record)
        ckpt.finalize_async_saves()
        self._dispatch("on_train_end")
        if self.stop_reason is not None and self.step < max_steps:
            log0(f"stopping after step {self.step} ({self.stop_reason}; checkpoint saved); rerun the same command to resume")
        else:
            log0(f"done: {self.step} steps, outputs in {self.run_dir}")

    def _dispatch(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def save(self) -> None:
        """Checkpoint the current step (model, optimizer, schedule, meta.json); callbacks' ``on_save`` follow."""
        meta = rundir.checkpoint_meta(self.cfg, self.step, self.tokenizer_id, self.tokenizer_path)
        ckpt.save_checkpoint(self.run_dir, self.step, self.model.module, self.optimizer, self.scheduler, meta,
                             self.cfg.train.keep_checkpoints, async_save=self.cfg.train.async_save)
        self._dispatch("on_save")

    def close(self, keep_distributed: bool = False) -> None:
        """Flush outputs and tear down torch.distributed, unless another Trainer follows in
        this process (demo model stages): re-creating gloo groups right after destroying
        them races between ranks and can fail with "connection refused"."""
        try:
            if not self.lock_lost:  # another run owns the run dir now: publish nothing there
                ckpt.finalize_async_saves()  # needs the process groups: before any teardown
            for callback in self.callbacks:
                callback.close(self)
        finally:
            if self.run_lock is not None:  # also after an error; only while it is still ours
                self.run_lock.release()
        if not keep_distributed:
            shutdown()
