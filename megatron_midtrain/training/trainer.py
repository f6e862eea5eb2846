"""The mid-training loop on megatron-core: build, (resume), train, evaluate, save, close."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import time
from datetime import datetime, timezone
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from omegaconf import OmegaConf

from megatron_midtrain.errors import UserError
from megatron_midtrain.data.tokenizer import tokenizer_fingerprint
from megatron_midtrain.eval import hook as lm_eval_hook
from megatron_midtrain.losses import build_method
from megatron_midtrain.losses.ntp import NTPMethod
from megatron_midtrain.model.builder import build_gpt_stage, build_transformer_config, have_transformer_engine
from megatron_midtrain.model.init import init_parameters
from megatron_midtrain.training import checkpoint as ckpt
from megatron_midtrain.training.data import StepBatches, build_data, prepare_sources, to_device
from megatron_midtrain.training.distributed import broadcast_object, init_distributed, shutdown
from megatron_midtrain.training.schedule import build_lr_scheduler
from megatron_midtrain.training.metrics import MetricsWriter, Progress, plot_metrics


def log0(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


class _ScoreOnly:
    """Adapter for a forward-only pass that returns a method's per-token scores as the report."""

    needs_reference = None

    def __init__(self, method):
        self.method = method

    def loss(self, logits, labels, loss_mask, extras, tp_group):
        score = self.method.score(logits, labels, loss_mask, extras, tp_group)
        return logits.sum() * 0.0, torch.zeros((), dtype=torch.int, device=logits.device), {"score": score}


def seed_everything(seed: int) -> None:
    """Python, numpy, torch and megatron's model-parallel RNG streams."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def param_dtype(cfg) -> torch.dtype:
    """The parameter dtype from train.precision (auto: bf16 on GPU, fp32 on CPU)."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    if precision == "bf16" and not torch.cuda.is_available():
        raise UserError("train.precision=bf16 needs a GPU", "use train.precision=fp32 (or auto) on the CPU")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def build_trainer(cfg) -> "Trainer":
    """The trainer for ``cfg.method``: RL methods (rmt, grpo) run the rollout loop."""
    from megatron_midtrain.losses import build_method

    if getattr(build_method(cfg.method), "is_rl", False):
        from megatron_midtrain.rl.trainer import RLTrainer

        return RLTrainer(cfg)
    return Trainer(cfg)


class Trainer:
    def __init__(self, cfg):
        """``cfg``: a validated :class:`MidtrainConfig` (see config/loader.py)."""
        self.cfg = cfg
        self.layout = init_distributed(cfg)
        self.rank0 = self.layout.rank == 0
        self.run_dir = self._choose_run_dir()
        seed_everything(cfg.run.seed)
        self.dtype = param_dtype(cfg)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

        seq = cfg.data.seq_length
        if cfg.train.global_batch_tokens % seq:
            raise UserError(
                f"train.global_batch_tokens={cfg.train.global_batch_tokens} is not a multiple of data.seq_length={seq}",
                "make the global batch a whole number of sequences",
            )
        self.global_batch_size = cfg.train.global_batch_tokens // seq
        per_step = cfg.train.micro_batch_size * self.layout.dp
        if self.global_batch_size % per_step:
            raise UserError(
                f"global batch of {self.global_batch_size} sequences is not divisible by micro_batch_size*DP = "
                f"{cfg.train.micro_batch_size}*{self.layout.dp}",
                "adjust train.global_batch_tokens or train.micro_batch_size",
            )

        # Validate everything that can be wrong with the inputs before the first write
        # to the run directory: a failed start leaves an existing run untouched.
        resume_meta = self._check_resumable()
        sources = prepare_sources(cfg)
        self.tokenizer_id = tokenizer_fingerprint(sources[0])
        self.tokenizer_path = sources[0].path
        self.method = build_method(cfg.method, eod_id=sources[0].eod)
        self._check_method_inputs(sources)
        # Validation loss is always plain NTP, so runs of different methods compare.
        self.eval_method = NTPMethod()
        if cfg.lm_eval.tasks:  # optional lm-eval tasks during training: check them before any work
            lm_eval_hook.check_lm_eval_config(cfg)
        self.model = self._build_model()
        self.reference = self._build_reference()
        self.optimizer, self.scheduler = self._build_optimizer()
        self._write_run_config()
        self.data = build_data(cfg, sources, self.global_batch_size)
        dp_rank = parallel_state.get_data_parallel_rank()
        self.train_batches = StepBatches(self.data.train, self.global_batch_size, cfg.train.micro_batch_size, dp_rank, self.layout.dp)
        self.valid_batches = (
            StepBatches(self.data.valid, self.global_batch_size, cfg.train.micro_batch_size, dp_rank, self.layout.dp)
            if self.data.valid is not None else None
        )
        self.step = self._resume(resume_meta)
        self.metrics = MetricsWriter(self.run_dir, self.step, cfg.run.tensorboard) if self.rank0 else None
        self._stop_requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._request_stop)

    # ------------------------------------------------------------------ set-up
    def _check_method_inputs(self, sources) -> None:
        """Method-specific input checks that must fail before anything is written (subclasses)."""

    def _choose_run_dir(self) -> str:
        run_dir = self.cfg.run.dir
        if not run_dir and self.rank0:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
            run_dir = os.path.join("runs", f"{self.cfg.run.name}-{stamp}")
        # Every rank must use rank 0's choice (timestamps differ between processes).
        run_dir = os.path.abspath(broadcast_object(run_dir))
        self.cfg.run.dir = run_dir
        return run_dir

    def _write_run_config(self) -> None:
        run_dir = self.run_dir
        if self.rank0:
            os.makedirs(run_dir, exist_ok=True)
            text = OmegaConf.to_yaml(OmegaConf.structured(self.cfg))
            tmp = os.path.join(run_dir, "config.yaml.tmp")
            with open(tmp, "w") as fh:
                fh.write(text)
            os.replace(tmp, os.path.join(run_dir, "config.yaml"))
        if dist.is_initialized():
            dist.barrier()

    def _build_model(self):
        cfg = self.cfg
        self.transformer_config = build_transformer_config(cfg.model, cfg.parallel, self.dtype)
        use_te = have_transformer_engine()
        stage = build_gpt_stage(cfg.model, self.transformer_config, cfg.data.seq_length, use_te)
        if torch.cuda.is_available():
            stage.cuda(torch.cuda.current_device())
        init_parameters([stage], cfg.run.seed, cfg.model.init_std, cfg.model.num_layers)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        )
        model = DistributedDataParallel(config=self.transformer_config, ddp_config=ddp_config, module=stage)
        self.transformer_config.no_sync_func = model.no_sync
        self.transformer_config.finalize_model_grads_func = finalize_model_grads
        n_params = sum(p.numel() for p in stage.parameters())
        log0(f"model: {cfg.model.name}, {n_params / 1e6:.2f}M parameters on rank 0's stage, "
             f"{'TE' if use_te else 'local'} spec, {self.dtype}, layout TP{self.layout.tp} PP{self.layout.pp} DP{self.layout.dp}")
        return model

    def _build_reference(self):
        need = self.method.needs_reference
        if need is None:
            return None
        ref_cfg = self.cfg.reference
        if ref_cfg.mode == "offline" and need != "target_logprobs":
            raise UserError(
                f"method={self.cfg.method.name} needs the reference's full distribution, which the offline store does not keep",
                "use reference.mode=colocated",
            )
        if ref_cfg.mode == "offline":
            # Pre-scored log-probs (tools/score_reference.py): the reference is never built.
            from megatron_midtrain.reference.offline import OfflineReference

            reference = OfflineReference(self.cfg, self.tokenizer_id, self.global_batch_size)
            log0(f"reference: offline scores from {reference.path}")
            return reference
        if ref_cfg.mode != "colocated":
            raise UserError(f"reference.mode={ref_cfg.mode!r} is unknown", "use reference.mode=colocated or offline")
        if not ref_cfg.checkpoint:
            raise UserError(f"method={self.cfg.method.name} needs a frozen reference model", "set reference.checkpoint=PATH (a run dir or checkpoint)")
        from megatron_midtrain.reference.colocated import ColocatedReference

        reference = ColocatedReference(self.cfg, self.tokenizer_id, self.dtype, have_transformer_engine())
        log0(f"reference: {reference.path}, frozen, {reference.num_params / 1e6:.2f}M parameters and "
             f"{reference.bytes / 2**20:.1f} MiB on rank 0's stage (no gradients, no optimizer state)")
        return reference

    def _build_optimizer(self):
        cfg = self.cfg
        opt_cfg = McoreOptimizerConfig(
            optimizer="adam",
            lr=cfg.optimizer.lr,
            min_lr=cfg.optimizer.min_lr,
            weight_decay=cfg.optimizer.weight_decay,
            adam_beta1=cfg.optimizer.adam_beta1,
            adam_beta2=cfg.optimizer.adam_beta2,
            adam_eps=cfg.optimizer.adam_eps,
            clip_grad=cfg.train.clip_grad,
            bf16=self.dtype == torch.bfloat16,
            params_dtype=self.dtype,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        )
        optimizer = get_megatron_optimizer(opt_cfg, [self.model])
        self.transformer_config.grad_scale_func = optimizer.scale_loss
        return optimizer, build_lr_scheduler(optimizer, cfg)

    def _checkpoint_meta(self) -> dict:
        return {
            "arch": ckpt.arch_signature(self.cfg.model),
            "layout": ckpt.layout(),
            "consumed_tokens": self.step * self.cfg.train.global_batch_tokens,
            "global_batch_tokens": self.cfg.train.global_batch_tokens,
            "seq_length": self.cfg.data.seq_length,
            "method": self.cfg.method.name,
            "tokenizer": self.tokenizer_id,
            # Enough to rebuild the model and its tokenizer from the checkpoint alone (tools).
            "model_config": dataclasses.asdict(self.cfg.model),
            "tokenizer_path": self.tokenizer_path,
            "seed": self.cfg.run.seed,
        }

    def _check_resumable(self) -> dict | None:
        """meta.json of the checkpoint to resume from (None for a fresh run), after checking
        that it matches this config's architecture and batch."""
        root = ckpt.checkpoint_root(self.run_dir)
        step = broadcast_object(ckpt.latest_checkpoint(root) if self.rank0 else None)
        if step is None:
            if self.cfg.train.init_from:  # fail on a bad init checkpoint before writing anything
                path = ckpt.resolve_checkpoint_dir(self.cfg.train.init_from, what="train.init_from")
                ckpt.check_compatible(ckpt.read_meta(path), self.cfg.model, path, what="train.init_from")
            return None
        path = os.path.join(root, f"iter_{step:07d}")
        meta = ckpt.read_meta(path)
        ckpt.check_compatible(meta, self.cfg.model, path)
        if meta.get("global_batch_tokens") not in (None, self.cfg.train.global_batch_tokens):
            raise UserError(
                f"{path} was trained with train.global_batch_tokens={meta['global_batch_tokens']}, "
                f"the config says {self.cfg.train.global_batch_tokens}",
                "resume with the same global batch or start a new run.dir",
            )
        meta["path"] = path
        return meta

    def _resume(self, meta: dict | None) -> int:
        if meta is None:
            if self.cfg.train.init_from:
                path = ckpt.resolve_checkpoint_dir(self.cfg.train.init_from, what="train.init_from")
                ckpt.load_model_weights(path, self.model.module, self.cfg.model, what="train.init_from")
                log0(f"initialised the model from {path}")
            return 0
        ckpt.load_checkpoint(meta["path"], self.model.module, self.optimizer, self.scheduler, self.cfg.model)
        log0(f"resumed from {meta['path']} (step {meta['step']})")
        return meta["step"]

    # ------------------------------------------------------------------ steps
    def _request_stop(self, signum, frame):  # noqa: ARG002
        self._stop_requested = True

    def _forward_step(self, method, data_iterator, model):
        batch = to_device(next(data_iterator), self.device)
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
        return output, partial(self._loss_func, method, batch["labels"], batch["loss_mask"], batch)

    def _loss_func(self, method, labels, loss_mask, extras, logits):
        tp_group = parallel_state.get_tensor_model_parallel_group()
        loss_sum, num_tokens, report = method.loss(logits, labels, loss_mask, extras, tp_group)
        if self._inject_nonfinite:
            loss_sum = loss_sum * float("nan")
        report = dict(report)
        report["loss"] = torch.stack([loss_sum.detach().double(), num_tokens.double()])
        return loss_sum, num_tokens, report

    def _method_extras(self, batches: StepBatches, step_index: int, forward_only: bool, method) -> list[dict]:
        """Per-micro-batch inputs a method needs beyond the data (reference scores, selections)."""
        extras = [{} for _ in range(batches.num_microbatches)]
        if method.needs_reference == "target_logprobs":
            ref = self.reference.target_logprobs(batches.iterator(step_index), batches.num_microbatches, self.device)
            for extra, r in zip(extras, ref):
                extra["ref_logprobs"] = r
        elif method.needs_reference == "logits":
            hidden = self.reference.final_hidden(batches.iterator(step_index), batches.num_microbatches, self.device)
            for extra, h in zip(extras, hidden):
                extra["ref_hidden"] = h
                extra["ref_logits_fn"] = self.reference.logits_from_hidden
        if getattr(method, "needs_policy_prepass", False) and not forward_only:
            # A forward-only policy pass scores every token of the global batch first
            # (e.g. RHO-1's global top-k); the method turns the scores into per-micro-batch inputs.
            scoring = _ScoreOnly(method)
            micro_batches = (dict(b, **e) for b, e in zip(batches.iterator(step_index), extras))
            reports = self._schedule(micro_batches, batches.num_microbatches, True, scoring)
            if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
                masks = [b["loss_mask"] for b in batches.iterator(step_index)]
                selected = method.select([r["score"] for r in reports], masks, parallel_state.get_data_parallel_group())
                for extra, sel in zip(extras, selected):
                    extra.update(sel)
        return extras

    def _schedule(self, micro_batches, num_microbatches: int, forward_only: bool, method, seq_length: int | None = None,
                  model=None) -> list:
        """megatron's schedule over ``micro_batches`` on the policy (or on ``model``, e.g. a frozen reference)."""
        seq_length = seq_length or self.cfg.data.seq_length
        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, method),
            data_iterator=micro_batches,
            model=[model if model is not None else self.model],
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=self._micro_batch_size(micro_batches),
            decoder_seq_length=seq_length,
            forward_only=forward_only,
        )

    def _micro_batch_size(self, micro_batches) -> int:
        # Rollout micro-batches (RL methods) carry their own size; corpus ones use the config's.
        return getattr(micro_batches, "micro_batch_size", self.cfg.train.micro_batch_size)

    def _run_batches(self, batches: StepBatches, step_index: int, forward_only: bool, method) -> dict:
        extras = self._method_extras(batches, step_index, forward_only, method)
        micro_batches = (dict(batch, **extra) for batch, extra in zip(batches.iterator(step_index), extras))
        reports = self._schedule(micro_batches, batches.num_microbatches, forward_only, method)
        return self._reduce_reports(reports, method)

    def _reduce_reports(self, reports: list, method) -> dict:
        """Sum [sum, count] pairs over micro-batches and DP ranks; share them with every rank."""
        summed = None
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            keys = sorted(reports[0]) if reports else []
            summed = torch.stack([sum(r[k] for r in reports) for k in keys]) if keys else torch.zeros(0, 2, dtype=torch.float64)
            if self.layout.dp > 1:
                dist.all_reduce(summed, group=parallel_state.get_data_parallel_group())
            summed = {k: summed[i].cpu() for i, k in enumerate(keys)}
        if self.layout.pp > 1:
            box = [summed]
            last = parallel_state.get_pipeline_model_parallel_last_rank()
            dist.broadcast_object_list(box, src=last, group=parallel_state.get_pipeline_model_parallel_group())
            summed = box[0]
        means = {k: (v[0] / v[1]).item() if v[1] > 0 else float("nan") for k, v in summed.items()}
        return method.finalize_report(means)

    def train_step(self) -> dict:
        step = self.step + 1
        self._inject_nonfinite = step in set(self.cfg.train.inject_nonfinite_at)
        start = time.perf_counter()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        report = self._run_batches(self.train_batches, step - 1, forward_only=False, method=self.method)
        loss = report["loss"]
        skipped, grad_norm = self._optimizer_step(step, loss)
        elapsed = time.perf_counter() - start
        tokens = self.cfg.train.global_batch_tokens
        record = {
            "step": step,
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": tokens / elapsed,
            "consumed_tokens": step * tokens,
            "step_time_s": elapsed,
        }
        if skipped:
            record["skipped"] = True
        record.update({k: v for k, v in report.items() if k != "loss"})
        return record

    def _optimizer_step(self, step: int, loss: float) -> tuple[bool, float]:
        """Step the optimizer unless the loss is non-finite; ``(skipped, grad_norm)``.
        The LR schedule advances even on a skipped step, so the LR stays a function of the step."""
        skipped = not math.isfinite(loss)
        grad_norm = float("nan")
        if not skipped:
            ok, grad_norm, _ = self.optimizer.step()
            skipped = not ok
        self.scheduler.step(increment=1)
        self.step = step
        return skipped, grad_norm

    def evaluate(self) -> float:
        if self.valid_batches is None:
            return float("nan")
        self.model.eval()
        totals = []
        with torch.no_grad():
            for i in range(self.cfg.train.eval_batches):
                self._inject_nonfinite = False
                totals.append(self._run_batches(self.valid_batches, i, forward_only=True, method=self.eval_method)["loss"])
        self.model.train()
        return float(np.mean(totals))

    def save(self) -> None:
        ckpt.save_checkpoint(self.run_dir, self.step, self.model.module, self.optimizer, self.scheduler,
                             self._checkpoint_meta(), self.cfg.train.keep_checkpoints,
                             async_save=self.cfg.train.async_save)
        if self.rank0 and self.cfg.run.plot:
            plot_metrics(self.run_dir)

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_requested else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = flag.to(self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def train(self) -> None:
        cfg = self.cfg.train
        if self.step >= cfg.max_steps:
            log0(f"run {self.run_dir} already finished step {self.step} >= train.max_steps={cfg.max_steps}; "
                 "raise train.max_steps to continue")
            return
        log0(f"training steps {self.step + 1}..{cfg.max_steps}: {self.global_batch_size} sequences x "
             f"{self.cfg.data.seq_length} tokens per step, {self.train_batches.num_microbatches} micro-batches of "
             f"{cfg.micro_batch_size} per DP rank; run dir {self.run_dir}")
        progress = Progress(cfg.max_steps, self.step)
        nonfinite_in_row = 0
        while self.step < cfg.max_steps:
            record = self.train_step()
            step = record["step"]
            if record.get("skipped"):
                nonfinite_in_row += 1
                log0(f"step {step}: non-finite loss ({record['loss']}), step skipped "
                     f"({nonfinite_in_row}/{cfg.max_consecutive_nonfinite} in a row)")
            else:
                nonfinite_in_row = 0
            if cfg.eval_interval and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
                record["val/loss"] = self.evaluate()
            if lm_eval_hook.due(self.cfg, step):
                record.update(lm_eval_hook.run_in_training(self))
            if self.metrics is not None:
                self.metrics.write(record)
            if step % cfg.log_interval == 0 or step == cfg.max_steps or step == 1:
                line = progress.line(record)
                if "val/loss" in record:
                    line += f" | val_loss {record['val/loss']:.4f}"
                log0(line)
            if nonfinite_in_row >= cfg.max_consecutive_nonfinite:
                raise UserError(
                    f"{nonfinite_in_row} consecutive steps had a non-finite loss (last at step {step}); "
                    f"the last good checkpoint is kept in {ckpt.checkpoint_root(self.run_dir)}",
                    "lower optimizer.lr, check the data, or raise train.max_consecutive_nonfinite",
                )
            stop = self._should_stop() or (cfg.exit_at_step is not None and step >= cfg.exit_at_step)
            if (cfg.save_interval and step % cfg.save_interval == 0) or step == cfg.max_steps or stop:
                self.save()
            else:
                ckpt.poll_async_saves()  # an async save whose writes all finished becomes complete now
            if stop:
                ckpt.finalize_async_saves()
                log0(f"stopping after step {step} (checkpoint saved); rerun the same command to resume")
                return
        ckpt.finalize_async_saves()
        log0(f"done: {self.step} steps, outputs in {self.run_dir}")

    def close(self, keep_distributed: bool = False) -> None:
        """Flush outputs and tear down torch.distributed, unless another Trainer follows in
        this process (demo model stages): re-creating gloo groups right after destroying
        them races between ranks and can fail with "connection refused"."""
        ckpt.finalize_async_saves()  # needs the process groups: before any teardown
        if self.metrics is not None:
            self.metrics.close()
        if not keep_distributed:
            shutdown()
