#!/usr/bin/env python
"""ReMiT cost, side by side in one run: NTP vs co-located ReMiT vs offline ReMiT.

Each mode runs in its own process (so peak memory is per mode) on the same model, data,
layout and steps; the reference is a trained checkpoint of the same architecture. Prints
median step time, the ratios to NTP, and peak memory (CUDA: max allocated; CPU: max RSS)
and its ratio to NTP. One JSON line at the end.

    python benchmarks/remit_overhead.py [--steps 10] [--warmup 3] [overrides ...]
    torchrun --nproc-per-node 8 ...  is not used: pass parallel.* overrides and --nproc N.

Goals (issue 3): co-located <= 1.40x NTP step time (the floor is ~1.33x: one extra forward
pass of a same-size model = 1/3 of forward+backward), offline <= 1.05x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _measure(overrides: list[str], steps: int, warmup: int) -> dict:
    """Run in a child process: time `steps` train steps after `warmup`, report peak memory."""
    import resource
    import time

    import torch

    from megatron_midtrain.utils.quiet import silence_known_warnings

    silence_known_warnings()
    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.training.trainer import Trainer

    cfg = load_config(overrides + [f"train.max_steps={steps + warmup}", "train.eval_interval=0", "run.plot=false"])
    trainer = Trainer(cfg)
    times = []
    try:
        for i in range(steps + warmup):
            start = time.perf_counter()
            trainer.train_step()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        trainer.close()
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"step_time_s": statistics.median(times), "peak_bytes": peak}


def _child(args, overrides: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--steps", str(args.steps), "--warmup", str(args.warmup), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2,
                        help="measure the three modes round-robin this many times; the fastest median per mode counts "
                             "(so a slow spell on a shared machine does not land on one mode only)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.child:
        print(json.dumps(_measure(overrides, args.steps, args.warmup)))
        return

    total = args.steps + args.warmup
    with tempfile.TemporaryDirectory() as tmp:
        ref_dir = os.path.join(tmp, "reference")
        store = os.path.join(tmp, "scores")
        print("preparing: a trained reference and its offline scores ...", flush=True)
        prep = [sys.executable, "-m", "megatron_midtrain.train", "method=ntp", "train.max_steps=4", "run.seed=7",
                "train.eval_interval=0", "run.plot=false", f"run.dir={ref_dir}", *overrides]
        subprocess.run(prep, check=True, capture_output=True, cwd=ROOT)
        score = [sys.executable, "tools/score_reference.py", "method=remit", f"train.max_steps={total}",
                 f"reference.checkpoint={ref_dir}", f"reference.scores={store}", f"run.dir={tmp}/score", *overrides]
        subprocess.run(score, check=True, capture_output=True, cwd=ROOT)
        modes = {
            "ntp": ["method=ntp"],
            "remit_colocated": ["method=remit", f"reference.checkpoint={ref_dir}"],
            "remit_offline": ["method=remit", "reference.mode=offline", f"reference.scores={store}"],
        }
        results: dict = {}
        for rnd in range(args.rounds):
            for name, extra in modes.items():
                print(f"round {rnd + 1}/{args.rounds}: measuring {name} ...", flush=True)
                r = _child(args, extra + [f"run.dir={tmp}/{name}-{rnd}", *overrides])
                best = results.setdefault(name, r)
                best["step_time_s"] = min(best["step_time_s"], r["step_time_s"])
                best["peak_bytes"] = max(best["peak_bytes"], r["peak_bytes"])
    base = results["ntp"]
    print(f"\n{'mode':<18}{'step (s)':>10}{'vs NTP':>9}{'peak MiB':>11}{'vs NTP':>9}")
    for name, r in results.items():
        r["step_time_ratio"] = r["step_time_s"] / base["step_time_s"]
        r["peak_memory_ratio"] = r["peak_bytes"] / base["peak_bytes"]
        print(f"{name:<18}{r['step_time_s']:>10.3f}{r['step_time_ratio']:>8.2f}x{r['peak_bytes'] / 2**20:>11.0f}{r['peak_memory_ratio']:>8.2f}x")
    print(json.dumps({"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "overrides": overrides, "results": results}))


if __name__ == "__main__":
    main()
