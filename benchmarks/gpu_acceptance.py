#!/usr/bin/env python
"""GPU acceptance run: every method, checkpointing and ~1B-model performance, in one script.

    python benchmarks/gpu_acceptance.py [--out gpu_acceptance.json]     # one GPU, bf16, NCCL world size 1
    torchrun --nproc-per-node 1 benchmarks/gpu_acceptance.py           # the same under torchrun
    python benchmarks/gpu_acceptance.py --cpu-smoke                     # tiny shapes, fp32, gloo (CI)

One process runs the real code path of ``midtrain`` (``Trainer`` with its
method's step, the train loop, dist checkpoints, the offline scorer, KV-cache generation) for:

1. **methods**: ntp, remit co-located, remit offline, rho1, kd, grpo and rmt each train
   ``--steps`` steps (5; 2 with ``--cpu-smoke``) of ``midtrain``'s train loop on the embedded
   demo from a fresh policy; every loss and grad norm must be finite and the last loss below the
   first. Side assets are built the way the test
   suite builds them: the frozen reference is the demo model after 4 NTP steps at lr 1e-2
   (``tests/conftest.py``), the offline store comes from ``reference.offline.score`` (what
   ``tools/score_reference.py`` runs), the RMT entropy index is the synthetic one of
   ``megatron_midtrain.testing.rollouts``. GRPO runs with ``method.kl_beta=0.1`` against that
   reference: its policy-gradient term is zero-mean on-policy (group-centred advantages, ratio 1),
   so the falling loss it must show is the k3 KL term pulling the fresh policy to the reference.
2. **checkpoint**: train 2 steps, save, train 2 more; a new trainer on the same run dir resumes
   at step 2 and must give a bitwise-identical step-3 loss (same weights, same batch) and the same
   step-4 loss (restored optimizer state; exact on the CPU, 1e-3 relative on CUDA, where
   attention backward kernels may reduce in another order). On CUDA with
   ``parallel.distributed_optimizer=true``; once with a synchronous save and once with
   ``train.async_save=true`` (reported as skipped while the config has no such key).
3. **performance** on a ~1B model (``--big-model``: ``olmo2_1b`` or ``qwen3_1p7b`` shapes, random
   init, sequence ``--seq`` 4096): NTP tokens/s, TFLOP/s and MFU, with the FLOP formula of
   ``benchmarks/throughput.py`` (6N + full attention + LM head) against the GPU's dense bf16
   peak (the table there; unknown GPUs: MFU n/a unless ``--peak-tflops``); peak memory
   (``torch.cuda.max_memory_allocated``); ReMiT co-located and offline step-time ratios to NTP
   (the reference: the same random-init model, saved as a checkpoint).
4. **rollout** on the same ~1B weights: greedy generated tokens/s of our KV-cache generation
   against Hugging Face ``generate`` on the exported weights (``benchmarks/rollout.py``'s timing).

Prints one markdown table (which device ran each check, which were skipped and why) and writes
the figures as JSON (``--out``). Nothing is hard-coded: every figure is measured in the run. The
exit status is 1 if any check failed.

``--cpu-smoke`` (CI, via tests/test_benchmarks.py; ~25 s on 2 cores): the same checks on the
CPU (``CUDA_VISIBLE_DEVICES`` is cleared) with gloo and fp32, tiny shapes (the ``*_tiny`` preset
of the big model's family with a 4096-entry vocabulary, sequence 256, 512 tokens per step), 2
steps per method (the fewest that can fall), 1 timed step, smaller RL batches, and the
distributed-optimizer check skipped (it needs CUDA). At those RL sizes GRPO's KL estimate is
noise, so its loss is reported but need not fall. Its figures only show that the code runs.

Sections can be run alone (``--only methods,checkpoint``); ``--workdir DIR`` keeps the
run directories, checkpoints and the exported HF model for inspection.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback

if __name__ == "__main__" and "--cpu-smoke" in sys.argv[1:]:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path (gloo, fp32, cpu_compat) even on a GPU machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from megatron_midtrain.utils.quiet import silence_known_warnings  # noqa: E402

silence_known_warnings()

#: The ~1B presets and the tiny preset of the same family that --cpu-smoke uses instead.
BIG_MODELS = {"olmo2_1b": "olmo2_tiny", "qwen3_1p7b": "qwen3_tiny"}
#: Overrides of every run: no periodic evaluation, saves or plots inside the measurements.
COMMON = ["train.eval_interval=0", "train.save_interval=0", "run.plot=false"]
#: NTP steps (lr 1e-2) of the frozen demo reference: tests/conftest.py's recipe.
REF_STEPS = 4
#: GRPO's KL weight (see the module docstring).
GRPO_KL_BETA = 0.1
#: --cpu-smoke's vocabulary of the stand-in for the ~1B model.
SMOKE_VOCAB = 4096
#: Relative tolerance of the step-4 loss after a resume on CUDA (see the module docstring).
CUDA_RESUME_RTOL = 1e-3

PASS, FAIL, SKIPPED, MEASURED = "PASS", "FAIL", "SKIPPED", "MEASURED"


class Run:
    """The checks' shared state: settings, the result rows, the working directory."""

    def __init__(self, args):
        import torch

        self.args = args
        self.smoke = args.cpu_smoke
        self.cuda = torch.cuda.is_available() and not self.smoke
        self.precision = "bf16" if self.cuda else "fp32"
        self.rows: list[dict] = []
        self.perf: dict = {}
        self.backend = None
        self.work = args.workdir or tempfile.mkdtemp(prefix="gpu_acceptance-")
        from megatron_midtrain.data.demo import default_cache_dir

        self.cache = default_cache_dir()

    # -------------------------------------------------------------- helpers
    def device_label(self) -> str:
        import torch

        if self.cuda:
            return f"cuda:{torch.cuda.current_device()} {torch.cuda.get_device_name()}, {self.precision}"
        return f"cpu, {self.precision}"

    def add(self, section: str, check: str, status: str, result: str, seconds: float | None = None,
            device: str | None = None, **details) -> dict:
        row = {"section": section, "check": check, "device": device if device is not None else self.device_label(),
               "status": status, "result": result, "seconds": None if seconds is None else round(seconds, 2),
               "details": details}
        self.rows.append(row)
        mark = f"[gpu_acceptance] {section}: {check}: {status}"
        print(f"{mark} ({row['seconds']} s) {result}", file=sys.stderr, flush=True)
        return row

    def skip(self, section: str, check: str, reason: str) -> dict:
        return self.add(section, check, SKIPPED, f"skipped: {reason}", device="-")

    def overrides(self, *extra: str, log_interval: int = 1) -> list[str]:
        return COMMON + [f"train.precision={self.precision}", f"train.log_interval={log_interval}"] + list(extra)

    def config(self, overrides: list[str]):
        from megatron_midtrain.config.loader import load_config

        return load_config(overrides)

    def note_backend(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and self.backend is None:
            self.backend = dist.get_backend()


def _release(trainer=None) -> None:
    """Close a trainer (keeping the process groups for the next one) and free its memory."""
    import torch

    if trainer is not None:
        trainer.close(keep_distributed=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _after_shutdown() -> None:
    """The process group was destroyed (the offline scorer does it): a single process outside
    torchrun gets a fresh rendezvous port for the next one."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1":
        from megatron_midtrain.utils.net import free_port

        os.environ["MASTER_PORT"] = str(free_port())


def _score_offline(cfg) -> dict:
    from megatron_midtrain.reference.offline import score

    try:
        return score(cfg)
    finally:
        _after_shutdown()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _finite(values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _fmt_losses(losses: list[float]) -> str:
    return " -> ".join(f"{v:.4f}" for v in losses)


# ------------------------------------------------------------------ 1. methods
def build_reference(run: Run, model: str, out: str) -> str:
    """The frozen reference of the reference-based methods: the tests' recipe (tests/conftest.py)."""
    from megatron_midtrain.testing.runs import train_and_report

    train_and_report([f"model={model}", f"run.dir={out}", f"train.max_steps={REF_STEPS}", "optimizer.lr=1e-2", "run.seed=7",
                      f"train.precision={run.precision}"], keep_distributed=True)
    run.note_backend()
    return out


#: Why --cpu-smoke does not require GRPO's loss to fall (on the GPU run it must).
GRPO_SMOKE_NOISE = ("falling not required at --cpu-smoke sizes: the k3 KL over ~100 sampled tokens is noise-dominated; "
                    "the GPU run's 16 x 8 rollouts must fall")


def method_runs(run: Run, reference: str, entropy_dirs: list[str]) -> dict:
    """name -> (overrides, needs the offline store, why the loss need not fall or None)."""
    from megatron_midtrain.training.demo_models import GRPO_DEMO

    steps = run.args.steps
    base = run.overrides(f"train.max_steps={steps}", "schedule.warmup_steps=0")
    if run.smoke:
        base += ["train.global_batch_tokens=1024", "train.micro_batch_size=4"]
        grpo_sizes = ["method.prompts_per_step=4", "method.group_size=4", "method.rollout_micro_batch_size=4",
                      "method.max_new_tokens=8", "method.generation_batch_rows=16"]
        rmt_sizes = ["method.prompts_per_step=4", "method.group_size=2", "method.rollout_micro_batch_size=4",
                     "method.generation_batch_rows=8"]
    else:  # the demo GRPO recipe's sizes; rmt_demo's own
        grpo_sizes = [f"method.{k}={v}" for k, v in GRPO_DEMO.items() if k != "eval_problems"]
        rmt_sizes = []
    ref = f"reference.checkpoint={reference}"
    return {
        "ntp": (base + ["method=ntp"], False, None),
        "remit (co-located)": (base + ["method=remit", ref], False, None),
        "remit (offline)": (base + ["method=remit", "reference.mode=offline"], True, None),
        "rho1": (base + ["method=rho1", ref], False, None),
        "kd": (base + ["method=kd", ref], False, None),
        "grpo": (base + ["method=grpo", "method.eval_problems=0", f"method.kl_beta={GRPO_KL_BETA}", ref] + grpo_sizes, False,
                 GRPO_SMOKE_NOISE if run.smoke else None),
        # rmt_demo's recipe and sizes (command-line overrides win over the experiment preset);
        # a fresh policy, not the demo base
        "rmt": (base + ["experiment=rmt_demo", f"method.entropy_dirs=[{entropy_dirs[0]},{entropy_dirs[1]}]"] + rmt_sizes,
                False, None),
    }


def train_method(run: Run, name: str, overrides: list[str], offline: bool, reference: str, no_fall: str | None = None) -> None:
    from megatron_midtrain.training.metrics import read_metrics
    from megatron_midtrain.training.trainer import Trainer

    start = time.perf_counter()
    slug = name.replace(" ", "_").replace("(", "").replace(")", "")
    run_dir = os.path.join(run.work, "methods", slug)
    overrides = overrides + [f"run.dir={run_dir}"]
    if offline:
        # tools/score_reference.py's scoring, with this run's overrides (same samples)
        store = os.path.join(run.work, "methods", "scores")
        overrides = overrides + [f"reference.scores={store}"]
        _score_offline(run.config(overrides + [f"reference.checkpoint={reference}"]))
    cfg = run.config(overrides)
    trainer = Trainer(cfg)
    run.note_backend()
    try:
        trainer.train()
    finally:
        _release(trainer)
    records = read_metrics(run_dir)
    losses = [r["loss"] for r in records]
    norms = [r.get("grad_norm") for r in records]
    finite = _finite(losses) and _finite(norms) and len(losses) == run.args.steps
    falling = len(losses) >= 2 and losses[-1] < losses[0]
    status = PASS if finite and (falling or no_fall) else FAIL
    what = ["finite" if finite else "non-finite loss or grad norm" if len(losses) == run.args.steps
            else f"only {len(losses)} of {run.args.steps} steps"]
    what.append("falling" if falling else "not falling" if no_fall else "loss did not fall")
    if no_fall:
        what.append(no_fall)
    result = f"loss {_fmt_losses(losses)} over {len(losses)} steps ({'; '.join(what)})"
    extra = {k: records[-1][k] for k in ("rl/kl", "rl/reward_mean", "rl/pg_loss", "rl/ntp_loss", "remit/w_mean")
             if records and k in records[-1]}
    run.add("methods", name, status, result, time.perf_counter() - start, losses=losses, grad_norms=norms, last=extra,
            overrides=overrides)



def check_methods(run: Run) -> None:
    from megatron_midtrain.testing.rollouts import demo_entropy_dirs

    start = time.perf_counter()
    reference = build_reference(run, "demo_llama_tiny", os.path.join(run.work, "methods", "reference"))
    entropy = demo_entropy_dirs(run.cache, os.path.join(run.work, "methods", "entropy"))
    print(f"[gpu_acceptance] methods: reference and entropy index ready in {time.perf_counter() - start:.1f} s",
          file=sys.stderr, flush=True)
    for name, (overrides, offline, no_fall) in method_runs(run, reference, entropy).items():
        _guarded(run, "methods", name, train_method, run, name, overrides, offline, reference, no_fall)


# ------------------------------------------------------------------ 2. checkpoints
def _has_async_save() -> bool:
    from megatron_midtrain.config.schema import TrainConfig

    return "async_save" in {f.name for f in dataclasses.fields(TrainConfig)}


def resume_check(run: Run, name: str, use_async: bool) -> None:
    from megatron_midtrain.training import checkpoint as ckpt
    from megatron_midtrain.training.trainer import Trainer

    start = time.perf_counter()
    run_dir = os.path.join(run.work, "checkpoint", "async" if use_async else "sync")
    extra = [f"parallel.distributed_optimizer={'true' if run.cuda else 'false'}"]
    if use_async:
        extra.append("train.async_save=true")
    cfg_overrides = run.overrides("method=ntp", "train.max_steps=4", f"run.dir={run_dir}", *extra)
    first = Trainer(run.config(cfg_overrides))
    run.note_backend()
    try:
        before = [first.train_step()["loss"] for _ in range(2)]
        first.save()  # step 2; training goes on while an async save is in flight
        after = [first.train_step()["loss"] for _ in range(2)]
    finally:
        _release(first)  # close() completes a pending async save
    saved = ckpt.latest_checkpoint(ckpt.checkpoint_root(run_dir))
    if saved != 2:
        run.add("checkpoint", name, FAIL, f"after save at step 2 and close(), the newest complete checkpoint is {saved}",
                time.perf_counter() - start)
        return
    second = Trainer(run.config(cfg_overrides))
    try:
        resumed_at = second.step
        again = [second.train_step()["loss"] for _ in range(2)]
    finally:
        _release(second)
    step3_same = again[0] == after[0]
    rel4 = abs(again[1] - after[1]) / max(abs(after[1]), 1e-12)
    tol4 = CUDA_RESUME_RTOL if run.cuda else 0.0
    ok = resumed_at == 2 and step3_same and rel4 <= tol4 and _finite(before + after + again)
    result = (f"resumed at step {resumed_at}; step 3 loss {after[0]:.6f} vs {again[0]:.6f} "
              f"({'bitwise identical' if step3_same else f'differs by {abs(again[0] - after[0]):.3g}'}), step 4 "
              f"{after[1]:.6f} vs {again[1]:.6f} (rel. diff {rel4:.2g}, allowed {tol4:g}); "
              f"distributed optimizer {'on' if run.cuda else 'off (needs CUDA)'}")
    run.add("checkpoint", name, PASS if ok else FAIL, result, time.perf_counter() - start,
            losses_uninterrupted=before + after, losses_resumed=again, distributed_optimizer=run.cuda, async_save=use_async)


def check_checkpoint(run: Run) -> None:
    _guarded(run, "checkpoint", "save (sync) -> load -> same next-step losses", resume_check, run,
             "save (sync) -> load -> same next-step losses", False)
    name = "async save (train.async_save) -> load -> same next-step losses"
    if _has_async_save():
        _guarded(run, "checkpoint", name, resume_check, run, name, True)
    else:
        run.skip("checkpoint", name, "train.async_save not available")
    if run.cuda:
        ran = [r for r in run.rows if r["section"] == "checkpoint" and r["status"] != SKIPPED]
        run.add("checkpoint", "distributed optimizer (parallel.distributed_optimizer=true)",
                PASS if ran and all(r["status"] == PASS for r in ran) else FAIL,
                f"used by the {len(ran)} checkpoint check(s) above (4 steps, save, load)")
    else:
        run.skip("checkpoint", "distributed optimizer (parallel.distributed_optimizer=true)",
                 "needs CUDA (refused on the CPU); the checks above used megatron's plain optimizer")


# ------------------------------------------------------------------ 3. performance
def _timed_steps(trainer, warmup: int, steps: int) -> dict:
    import torch

    for _ in range(warmup):
        trainer.train_step()
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(trainer.train_step()["loss"])
        _sync()
        times.append(time.perf_counter() - t0)
    out = {"step_times_s": times, "step_time_s": statistics.median(times), "losses": losses}
    out["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _max_rss()
    return out


def _max_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _si(value: float, unit: str) -> str:
    """1.48e9 -> '1.48 G<unit>', 2.5e5 -> '250.0 k<unit>'."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{' ' if unit else ''}{prefix}{unit}"
    return f"{value:.2f}{' ' if unit else ''}{unit}"


def _memory_note(run: Run) -> str:
    return "max allocated" if run.cuda else "process max RSS, CPU"


def check_performance(run: Run) -> None:
    import numpy as np
    from throughput import flops_per_token, peak_flops

    from megatron_midtrain.model.builder import padded_vocab_size
    from megatron_midtrain.training import checkpoint as ckpt
    from megatron_midtrain.training.run_dir import checkpoint_meta
    from megatron_midtrain.training.trainer import Trainer

    a = run.args
    preset = BIG_MODELS[a.big_model] if run.smoke else a.big_model
    seq = a.seq
    tokens = a.big_batch_tokens or seq * (2 if run.smoke else 8)
    total = a.perf_warmup + a.perf_steps
    perf_dir = os.path.join(run.work, "perf")
    reference = os.path.join(perf_dir, "reference")
    base = run.overrides(f"model={preset}", f"data.seq_length={seq}", f"train.global_batch_tokens={tokens}",
                         f"train.micro_batch_size={a.big_micro_batch}", f"train.max_steps={total}", log_interval=1000000)
    if run.smoke:  # like the ~1B presets, a model vocabulary larger than the demo tokenizer's 2048
        base.append(f"model.vocab_size={SMOKE_VOCAB}")
    modes = {
        "ntp": ["method=ntp"],
        "remit_colocated": ["method=remit", f"reference.checkpoint={reference}"],
        "remit_offline": ["method=remit", "reference.mode=offline", f"reference.scores={os.path.join(perf_dir, 'scores')}"],
    }
    results: dict = {}
    run.perf.update(model_preset=preset, seq_length=seq, global_batch_tokens=tokens, micro_batch_size=a.big_micro_batch,
                    warmup_steps=a.perf_warmup, timed_steps=a.perf_steps, modes=results)
    model_label = preset if not run.smoke else f"{preset} (for {a.big_model})"
    for mode, extra in modes.items():
        label = {"ntp": f"{model_label} NTP: tokens/s, MFU, peak memory",
                 "remit_colocated": f"{model_label} ReMiT co-located: step time vs NTP",
                 "remit_offline": f"{model_label} ReMiT offline: step time vs NTP"}[mode]
        if mode != "ntp" and "ntp" not in results:
            run.skip("performance", label, "the NTP run failed")
            continue

        def one(mode=mode, extra=extra, label=label):
            start = time.perf_counter()
            overrides = base + extra + [f"run.dir={os.path.join(perf_dir, mode)}"]
            if mode == "remit_offline":  # score the reference over exactly these samples first
                _score_offline(run.config(overrides + [f"reference.checkpoint={reference}"]))
            cfg = run.config(overrides)
            trainer = Trainer(cfg)
            run.note_backend()
            try:
                if mode == "ntp":
                    # The reference of the ReMiT modes: these initial weights, saved model-only.
                    ckpt.save_checkpoint(reference, 0, trainer.model.module, None, trainer.scheduler,
                                         checkpoint_meta(cfg, trainer.step, trainer.tokenizer_id, trainer.tokenizer_path),
                                         keep=1)
                    n_params = sum(p.numel() for p in trainer.model.module.parameters())
                    rng = np.random.default_rng(0)
                    run.perf["rollout_inputs"] = {
                        "tokenizer": trainer.data.tokenizer,
                        "prompts": [trainer.data.train[int(i)]["tokens"][: a.rollout_prompt_tokens].tolist()
                                    for i in rng.integers(0, len(trainer.data.train), a.rollout_batch)],
                    }
                    run.perf.update(model=cfg.model.name, parameters=n_params, dtype=str(trainer.dtype).replace("torch.", ""),
                                    spec="TE" if _te() else "local")
                timing = _timed_steps(trainer, a.perf_warmup, a.perf_steps)
            finally:
                _release(trainer)
            timing["tokens_per_s"] = tokens / timing["step_time_s"]
            results[mode] = timing
            mem = f"peak memory {_gib(timing['peak_memory_bytes'])} ({_memory_note(run)})"
            if mode == "ntp":
                flops = flops_per_token(cfg.model, seq, padded_vocab_size(cfg.model, 1))
                tflops = flops["total"] * timing["tokens_per_s"] / 1e12
                peak = peak_flops(_device_name(), a.peak_tflops) if run.cuda else None
                mfu = tflops * 1e12 / peak if peak else None
                run.perf.update(flops_per_token=flops, tflops_per_gpu=tflops, peak_tflops=peak / 1e12 if peak else None, mfu=mfu)
                mfu_text = (f"MFU {mfu:.1%} of {peak / 1e12:.0f} TFLOP/s" if mfu is not None else
                            "MFU n/a (" + ("CPU" if not run.cuda else f"unknown peak for {_device_name()}; pass --peak-tflops") + ")")
                result = (f"{cfg.model.name}, {_si(run.perf['parameters'], '')} params, {run.perf['spec']} spec, seq {seq}, "
                          f"{tokens} tokens/step: {timing['tokens_per_s']:,.0f} tokens/s, median step {timing['step_time_s']:.3f} s, "
                          f"{_si(tflops * 1e12, 'FLOP/s')}, {mfu_text}; {mem}")
            else:
                ratio = timing["step_time_s"] / results["ntp"]["step_time_s"]
                mratio = timing["peak_memory_bytes"] / results["ntp"]["peak_memory_bytes"]
                timing.update(step_time_ratio=ratio, peak_memory_ratio=mratio)
                result = (f"step {timing['step_time_s']:.3f} s vs NTP {results['ntp']['step_time_s']:.3f} s = {ratio:.2f}x; "
                          f"{mem}, {mratio:.2f}x NTP")
            finite = _finite(timing["losses"])
            run.add("performance", label, MEASURED if finite else FAIL, result + ("" if finite else "; non-finite loss"),
                    time.perf_counter() - start, **{k: v for k, v in timing.items() if k != "losses"}, losses=timing["losses"])

        _guarded(run, "performance", label, one)


# ------------------------------------------------------------------ 4. rollout
def check_rollout(run: Run) -> None:
    a = run.args
    preset = BIG_MODELS[a.big_model] if run.smoke else a.big_model
    label = f"{preset if not run.smoke else f'{preset} (for {a.big_model})'} rollout: KV-cache generate vs HF generate"
    inputs = run.perf.get("rollout_inputs")
    reference = os.path.join(run.work, "perf", "reference")
    if not inputs or not os.path.isdir(reference):
        run.skip("rollout", label, "needs the ~1B weights of the performance check, which did not run")
        return
    try:
        import transformers  # noqa: F401
    except ImportError:
        run.skip("rollout", label, "transformers is not installed (pip install -e '.[hf]')")
        return

    def one():
        from rollout import _export_hf, _time_generation

        from megatron_midtrain.eval.scorer import init_parallel, load_stage

        start = time.perf_counter()
        init_parallel(1, 1)
        run.note_backend()
        model, _, meta = load_stage(reference)
        hf_dir = _export_hf(meta["path"], os.path.join(run.work, "perf", "hf"))
        gen = _time_generation(model, inputs["tokenizer"], inputs["prompts"], a.rollout_new_tokens, a.rollout_repeats, hf_dir)
        del model
        _release()
        run.perf["rollout"] = dict(gen, rows=len(inputs["prompts"]), prompt_tokens=a.rollout_prompt_tokens,
                                   new_tokens=a.rollout_new_tokens, repeats=a.rollout_repeats)
        ours, hf, rec = (gen[k]["tokens_per_s"] for k in ("kv_cache", "hf_generate", "recompute"))
        result = (f"{len(inputs['prompts'])} rows x {a.rollout_prompt_tokens} prompt + {a.rollout_new_tokens} new tokens, greedy: "
                  f"KV-cache {ours:,.0f} tok/s, HF generate {hf:,.0f} tok/s ({ours / hf:.2f}x), no-cache recompute "
                  f"{rec:,.0f} tok/s; greedy tokens equal to HF's: {gen['same_tokens']['hf_generate']}"
                  + (" (informational: random bf16 weights give near-tied logits)" if run.cuda else ""))
        run.add("rollout", label, MEASURED, result, time.perf_counter() - start)

    _guarded(run, "rollout", label, one)


# ------------------------------------------------------------------ driver
def _te() -> bool:
    from megatron_midtrain.model.builder import have_transformer_engine

    return have_transformer_engine()


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _guarded(run: Run, section: str, check: str, fn, *args) -> None:
    """Run one check; an exception is a FAIL row (traceback on stderr), and the next check starts
    from fresh process groups."""
    start = time.perf_counter()
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001 - every failure becomes a row
        traceback.print_exc()
        msg = " ".join(f"{type(err).__name__}: {err}".split())
        run.add(section, check, FAIL, msg[:300], time.perf_counter() - start)
        from megatron_midtrain.training.distributed import shutdown

        try:
            shutdown()
        finally:
            _after_shutdown()
        _release()


def environment(run: Run) -> dict:
    import torch

    try:
        import megatron.core as mcore

        mcore_version = getattr(mcore, "__version__", "?")
    except Exception:  # noqa: BLE001
        mcore_version = None
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    return {
        "mode": "cpu-smoke" if run.smoke else "gpu",
        "device": _device_name() if run.cuda else "cpu",
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "precision": run.precision,
        "backend": run.backend,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "layer_spec": "TE" if (run.cuda and _te()) else "local",
        "transformer_engine": _te(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "megatron_core": mcore_version,
        "transformers": hf_version,
        "cpu_threads": torch.get_num_threads(),
        "host": platform.node(),
    }


def markdown(run: Run, env: dict, total_s: float) -> str:
    lines = [
        f"GPU acceptance ({env['mode']}): {env['device']}, {env['precision']}, {env['backend']} world size "
        f"{env['world_size']}, {env['layer_spec']} layer spec; torch {env['torch']}, megatron-core {env['megatron_core']}; "
        f"{total_s:.0f} s",
        "",
        "| # | section | check | device | status | result |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(run.rows, 1):
        result = r["result"].replace("|", "\\|")
        lines.append(f"| {i} | {r['section']} | {r['check']} | {r['device']} | {r['status']} | {result} |")
    flops = run.perf.get("flops_per_token")
    if flops:
        lines += ["", f"MFU = FLOPs/token x tokens/s / peak dense bf16 FLOP/s; FLOPs/token = 6N + 12·L·s·a + 6·h·V "
                      f"(dense matmuls + full attention + LM head, benchmarks/throughput.py) = "
                      f"{_si(flops['dense'], 'FLOP')} + {_si(flops['attention_full'], 'FLOP')} + {_si(flops['lm_head'], 'FLOP')} = "
                      f"{_si(flops['total'], 'FLOP')}/token for {run.perf.get('model')} at s={run.perf.get('seq_length')} "
                      f"(N = {_si(flops['n_params_nonembedding'], '')} non-embedding weights); peak: "
                      + (f"{run.perf['peak_tflops']:.0f} TFLOP/s" if run.perf.get("peak_tflops") else "n/a") + "."]
    return "\n".join(lines)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if k != "rollout_inputs"}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


SECTIONS = ("methods", "checkpoint", "performance", "rollout")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, fp32 on the CPU with gloo, 2 steps per method (CI)")
    p.add_argument("--out", default="gpu_acceptance.json", help="JSON output (default gpu_acceptance.json)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    p.add_argument("--steps", type=int, default=None, help="steps per method (default 5; --cpu-smoke 2)")
    p.add_argument("--big-model", choices=sorted(BIG_MODELS), default="olmo2_1b", help="~1B preset (conf/model/)")
    p.add_argument("--seq", type=int, default=None, help="sequence length of the ~1B runs (default 4096; --cpu-smoke 256)")
    p.add_argument("--big-batch-tokens", type=int, default=None, help="global batch of the ~1B runs (default 8 x --seq; smoke 2 x)")
    p.add_argument("--big-micro-batch", type=int, default=1)
    p.add_argument("--perf-warmup", type=int, default=None, help="untimed steps per mode (default 2; --cpu-smoke 0)")
    p.add_argument("--perf-steps", type=int, default=None, help="timed steps per mode (default 5; --cpu-smoke 1)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s for MFU (default: by GPU name)")
    p.add_argument("--rollout-batch", type=int, default=None, help="rows generated together (default 32; smoke 2)")
    p.add_argument("--rollout-prompt-tokens", type=int, default=None, help="default 128; smoke 4")
    p.add_argument("--rollout-new-tokens", type=int, default=None, help="default 128; smoke 2")
    p.add_argument("--rollout-repeats", type=int, default=None, help="timed repeats, median (default 2; smoke 1)")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary directory, removed at the end)")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    defaults = {"steps": (2, 5), "seq": (256, 4096), "perf_warmup": (0, 2), "perf_steps": (1, 5), "rollout_batch": (2, 32),
                "rollout_prompt_tokens": (4, 128), "rollout_new_tokens": (2, 128), "rollout_repeats": (1, 2)}
    for key, (small, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if smoke else full)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    if args.steps < 2:
        p.error("--steps must be >= 2 (a falling loss needs two steps)")
    if args.perf_steps < 1 or args.perf_warmup < 0:
        p.error("--perf-steps must be >= 1 and --perf-warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        sys.exit("error: gpu_acceptance.py runs on one process (world size 1); use torchrun --nproc-per-node 1 or plain python")
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("error: no CUDA device; fix: run on a GPU machine, or pass --cpu-smoke for the CPU smoke run")
    t0 = time.perf_counter()
    run = Run(args)
    try:
        if "methods" in args.sections:
            check_methods(run)
        if "checkpoint" in args.sections:
            check_checkpoint(run)
        if "performance" in args.sections:
            check_performance(run)
        if "rollout" in args.sections:
            check_rollout(run)
    finally:
        from megatron_midtrain.training.distributed import shutdown

        shutdown()
        if not args.workdir:
            shutil.rmtree(run.work, ignore_errors=True)
    total = time.perf_counter() - t0
    env = environment(run)
    table = markdown(run, env, total)
    print(table, flush=True)
    failed = [r for r in run.rows if r["status"] == FAIL]
    report = {"environment": env, "total_seconds": round(total, 1), "all_passed": not failed,
              "checks": run.rows, "performance": run.perf, "markdown": table, "args": vars(args)}
    with open(args.out, "w") as fh:
        json.dump(_jsonable(report), fh, indent=2)
    print(f"\nwrote {os.path.abspath(args.out)}; {len(failed)} failed, "
          f"{sum(r['status'] == SKIPPED for r in run.rows)} skipped, {len(run.rows)} checks", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
