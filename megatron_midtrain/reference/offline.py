"""Offline reference: score once with tools/score_reference.py, train many times from the store.

:func:`score_reference` runs the frozen reference over exactly the samples training will
consume (the trainer's data pipeline, seed and batch order) and writes each sample's
target-token log-probs into a :mod:`~megatron_midtrain.reference.store`. During training,
:class:`OfflineReference` replaces :class:`~megatron_midtrain.reference.colocated.ColocatedReference`:
it reads rows by global sample id instead of running a model, so the reference costs no
memory and no compute in the training job.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_midtrain.errors import UserError
from megatron_midtrain.reference import store as score_store
from megatron_midtrain.training.distributed import broadcast_object


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _on_rank0(fn):
    """Run ``fn`` on rank 0 only; a UserError there is raised on every rank (no rank hangs)."""
    result, error = None, None
    if _rank0():
        try:
            result = fn()
        except UserError as err:
            error = str(err)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise UserError(error)
    return result


class OfflineReference:
    """Serves pre-scored reference log-probs by sample id; the reference model is never built."""

    def __init__(self, cfg, tokenizer_id: str | None, global_batch_size: int):
        if not cfg.reference.scores:
            raise UserError("reference.mode=offline needs reference.scores", "set reference.scores=PATH (made by tools/score_reference.py)")
        self.cfg = cfg
        self.path = os.path.abspath(cfg.reference.scores)
        self.global_batch_size = global_batch_size
        _on_rank0(lambda: self._validate(tokenizer_id))
        self.store = score_store.open_store(self.path)

    def _validate(self, tokenizer_id) -> None:
        from megatron_midtrain.training.data import resolve_sources

        meta = score_store.read_meta(self.path)
        _, prefixes, weights = resolve_sources(self.cfg)
        expected = score_store.alignment_meta(self.cfg, tokenizer_id, self.global_batch_size, prefixes, weights)
        score_store.check_meta(meta, expected, self.path)
        if self.cfg.reference.checkpoint:  # optional: if given, it must be the reference that was scored
            from megatron_midtrain.training.checkpoint import resolve_checkpoint_dir

            given = os.path.realpath(resolve_checkpoint_dir(self.cfg.reference.checkpoint, what="reference.checkpoint"))
            if given != os.path.realpath(meta.get("reference_checkpoint") or ""):
                raise UserError(
                    f"offline score store {self.path} was scored with reference {meta.get('reference_checkpoint')}, "
                    f"but reference.checkpoint is {given}",
                    "drop reference.checkpoint in offline mode, or re-score with tools/score_reference.py",
                )
        needed = self.cfg.train.max_steps * self.global_batch_size
        if meta["num_samples"] < needed:
            # Not an error yet: training fails at the first step without scores (it may stop earlier).
            print(f"warning: offline score store {self.path} holds {meta['num_samples'] // self.global_batch_size} "
                  f"steps, train.max_steps={self.cfg.train.max_steps}", flush=True)

    def _require_step(self, first_sample_id: int) -> None:
        """Every rank checks the whole global batch of the step, so all ranks fail together."""
        G = self.global_batch_size
        start = (int(first_sample_id) // G) * G
        self.store.require_done(np.arange(start, start + G))

    @torch.no_grad()
    def target_logprobs(self, micro_batches, num_microbatches: int, device) -> list:
        """Stored log-probs of each micro-batch's labels ([mbs, seq] fp32) on the last stage, None elsewhere."""
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        out = []
        for i, batch in enumerate(micro_batches):
            ids = batch["sample_ids"].numpy()
            if i == 0:
                self._require_step(ids[0])
                if not last:  # only the last stage computes the loss: skip the reads elsewhere
                    break
            rows = self.store.read_rows(ids, batch["tokens"].numpy(), batch["labels"].numpy())
            out.append(torch.from_numpy(rows).to(device))
        if not last:
            return [None] * num_microbatches
        if len(out) != num_microbatches:
            raise RuntimeError(f"expected {num_microbatches} micro-batches, got {len(out)}")
        return out


# ---------------------------------------------------------------------- scoring
class _Recording:
    """Wraps a micro-batch iterator and keeps what it yielded (ids and tokens for the writer)."""

    def __init__(self, iterator):
        self.iterator = iterator
        self.seen = []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.iterator)
        self.seen.append(batch)
        return batch


def score_reference(overrides: list[str], dtype: str = "float32", log_interval: int = 0) -> dict:
    """Load the config from Hydra ``overrides`` and fill the store (see :func:`score`)."""
    from megatron_midtrain.config.loader import load_config

    return score(load_config(overrides), dtype=dtype, log_interval=log_interval)


def score(cfg, dtype: str = "float32", log_interval: int = 0) -> dict:
    """Score training steps 1..train.max_steps into ``cfg.reference.scores``. Collective (every rank).

    The data are built exactly as the trainer builds them; the reference runs as the co-located
    one does (same layout, same dtype). The last pipeline stage's TP-rank-0 process of every
    data-parallel group writes its own rows. Steps already complete in the store are skipped.
    Returns a summary (rank 0's is complete).
    """
    from megatron_midtrain.data.tokenizer import tokenizer_fingerprint
    from megatron_midtrain.model.builder import have_transformer_engine
    from megatron_midtrain.reference.colocated import ColocatedReference
    from megatron_midtrain.training.data import StepBatches, build_data, prepare_sources
    from megatron_midtrain.training.distributed import init_distributed, shutdown
    from megatron_midtrain.training.runtime import param_dtype, seed_everything

    if dtype not in score_store.DTYPES:
        raise UserError(f"--dtype {dtype} is not supported", "use --dtype float16 or float32")
    if not cfg.reference.checkpoint:
        raise UserError("scoring needs the reference model", "set reference.checkpoint=PATH (a run dir or checkpoint)")
    if not cfg.reference.scores:
        raise UserError("scoring needs the store's location", "set reference.scores=DIR (the directory to write)")
    seq = cfg.data.seq_length
    if cfg.train.global_batch_tokens % seq:
        raise UserError(
            f"train.global_batch_tokens={cfg.train.global_batch_tokens} is not a multiple of data.seq_length={seq}",
            "make the global batch a whole number of sequences",
        )
    G = cfg.train.global_batch_tokens // seq
    path = os.path.abspath(cfg.reference.scores)
    layout = init_distributed(cfg)
    try:
        if G % (cfg.train.micro_batch_size * layout.dp):
            raise UserError(
                f"global batch of {G} sequences is not divisible by micro_batch_size*DP = {cfg.train.micro_batch_size}*{layout.dp}",
                "adjust train.global_batch_tokens or train.micro_batch_size",
            )
        seed_everything(cfg.run.seed)
        sources = prepare_sources(cfg)
        tokenizer_id = tokenizer_fingerprint(sources[0])
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        param_dtype = param_dtype(cfg)
        reference = ColocatedReference(cfg, tokenizer_id, param_dtype, have_transformer_engine())
        meta = dict(
            score_store.alignment_meta(cfg, tokenizer_id, G, sources[1], sources[2]),
            num_samples=cfg.train.max_steps * G,
            dtype=dtype,
            reference_checkpoint=os.path.realpath(reference.path),
            reference_precision=str(param_dtype).replace("torch.", ""),
        )

        def create():
            store = score_store.create_or_open(path, meta)
            todo = [s for s in range(1, cfg.train.max_steps + 1) if not store.step_done(s)]
            return todo

        todo = _on_rank0(create)
        # megatron-core's index cache must be shared by all ranks (rank 0 builds it first).
        cfg.run.dir = path
        data = build_data(cfg, sources, G)
        dp_rank = parallel_state.get_data_parallel_rank()
        batches = StepBatches(data.train, G, cfg.train.micro_batch_size, dp_rank, layout.dp)
        writer = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                  and parallel_state.get_tensor_model_parallel_rank() == 0
                  and parallel_state.get_context_parallel_rank() == 0)
        store = score_store.open_store(path, writable=writer)
        skipped = cfg.train.max_steps - len(todo)
        if _rank0():
            print(f"scoring {len(todo)} of {cfg.train.max_steps} steps ({skipped} already in the store) with reference "
                  f"{reference.path}: {G} sequences x {seq} tokens per step, TP{layout.tp} PP{layout.pp} DP{layout.dp}, "
                  f"{dtype} rows into {path}", flush=True)
        interval = log_interval or max(1, len(todo) // 20)
        start = time.perf_counter()
        for n, step in enumerate(todo, 1):
            recording = _Recording(batches.iterator(step - 1))
            logprobs = reference.target_logprobs(recording, batches.num_microbatches, device)
            if writer:
                ids = torch.cat([b["sample_ids"] for b in recording.seen]).numpy()
                rows = torch.cat([lp.float().cpu() for lp in logprobs]).numpy()
                tokens = torch.cat([b["tokens"] for b in recording.seen]).numpy()
                labels = torch.cat([b["labels"] for b in recording.seen]).numpy()
                store.write_rows(ids, rows, [score_store.sample_digest(t, lab) for t, lab in zip(tokens, labels)])
            if _rank0() and (n % interval == 0 or n == len(todo) or n == 1):
                elapsed = time.perf_counter() - start
                rate = n * G / elapsed
                eta = (len(todo) - n) * G / rate
                print(f"scored step {step} ({n}/{len(todo)}) | {rate:.1f} samples/s | {rate * seq:.0f} tok/s | "
                      f"ETA {_duration(eta)}", flush=True)
        elapsed = time.perf_counter() - start
        if dist.is_initialized():
            dist.barrier()
        store.close()
        # Every writer has finished: confirm on rank 0 that steps 1..max_steps are complete.
        complete = _on_rank0(lambda: score_store.open_store(path).scored_steps() >= cfg.train.max_steps)
        summary = {"path": path, "scored_steps": len(todo), "skipped_steps": skipped, "seconds": elapsed,
                   "samples_per_s": len(todo) * G / elapsed if todo and elapsed > 0 else 0.0}
        if _rank0():
            if not complete:
                raise RuntimeError(f"{path}: some samples of steps 1..{cfg.train.max_steps} are still missing")
            print(f"done: scored {len(todo) * G} samples ({len(todo) * G * seq} tokens) in {_duration(elapsed)}, "
                  f"{summary['samples_per_s']:.1f} samples/s, {summary['samples_per_s'] * seq:.0f} tok/s; "
                  f"store {path} holds steps 1..{cfg.train.max_steps}", flush=True)
        return summary
    finally:
        shutdown()


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"
