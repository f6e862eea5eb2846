#!/usr/bin/env python
"""Record 10-step losses of every method before issue 13's trainer restructuring.

    python tests/data/record_refactor_baseline.py [--out tests/data/refactor_baseline.json] [--this-machine]

Issue 13 restructures the training core with no change in behaviour; the suite then has to
reproduce these numbers bit for bit (fp32, CPU, gloo). For ntp, remit (co-located and
offline), rho1, kd, grpo and rmt, at TP1 (1 rank) and TP2·PP2 (4 ranks), it trains 10 steps
from the same seed and keeps every number of each step's ``metrics.jsonl`` record except
wall-clock timings (loss, grad norm, lr, method statistics, rollout rewards and lengths).
RL methods use real, seeded rollouts (the whole rollout -> reward -> update loop; GRPO with
a k3 KL term to the reference, since a random policy's rewards, and so its advantages, are 0). The frozen
reference is the demo model after 4 NTP steps at lr 1e-2 (as in tests/conftest.py), and the
offline store is that reference's scores of the same 10 steps.

``record(root)`` returns the same structure as the JSON, so a test can rerun it and compare.

Bit-for-bit holds on one kind of machine only: fp32 results depend on the CPU's vector ISA
(ATen's ``AVX2``/``AVX512`` kernels, MKL's code path) and the thread count. ``--this-machine``
adds the current code's record under :func:`machine_fingerprint` (the ``machines`` key) and keeps
everything else; the test compares bitwise against the record of its own kind of machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

STEPS = 10
LAYOUTS = {"tp1": (1, []), "tp2pp2": (4, ["parallel.tp=2", "parallel.pp=2"])}
_RL = ["method.prompts_per_step=4", "method.group_size=4", "method.rollout_micro_batch_size=4", "method.max_new_tokens=8",
       "optimizer.lr=1e-3", "schedule.warmup_steps=0"]


def method_overrides(ref: str, store: str, entropy_dirs: list[str]) -> dict[str, list[str]]:
    return {
        "ntp": [],
        "remit": ["method=remit", f"reference.checkpoint={ref}"],
        "remit_offline": ["method=remit", "reference.mode=offline", f"reference.scores={store}"],
        "rho1": ["method=rho1", f"reference.checkpoint={ref}"],
        "kd": ["method=kd", "method.temperature=2.0", "method.alpha=0.5", f"reference.checkpoint={ref}"],
        # A random policy gets the same (zero) reward for every rollout, so GRPO's advantages
        # vanish; the k3 KL to the reference keeps its gradient, and so the record, informative.
        # method.kl_clamp=0: the k3 clamp (issue 14) came after this record and acts on it (KL 0.445
        # -> 0.436 at step 2); off, the code reproduces the record bit for bit.
        "grpo": ["method=grpo", "method.eval_problems=0", "method.answer_format=plain", "method.kl_beta=0.1",
                 "method.kl_clamp=0", f"reference.checkpoint={ref}"] + _RL,
        "rmt": ["method=rmt", "method.prompt_template='{context}'", "method.answer_format=plain", "method.context_tokens=32",
                "method.budget_b0=4", "method.budget_gamma=0.5", f"method.entropy_dirs=[{entropy_dirs[0]},{entropy_dirs[1]}]"] + _RL,
    }


#: Wall-clock figures: they differ from run to run by nature.
_TIMING = ("tokens_per_s", "step_time_s", "rl/gen_tokens_per_s", "rl/gen_time_s", "rl/train_time_s", "rl/gen_time_frac")


def _deterministic(record: dict) -> dict:
    """Every logged number of a step except wall-clock timings (GRPO's on-policy loss is 0 by
    construction, so its grad norm and rollout statistics carry the comparison)."""
    return {k: v for k, v in record.items() if k not in _TIMING and isinstance(v, (int, float))}


def _score(overrides: list[str]) -> dict:
    from megatron_midtrain.reference.offline import score_reference
    from megatron_midtrain.testing.runs import with_test_defaults

    return score_reference(with_test_defaults(overrides))


def record(root: str) -> dict:
    """Train every (layout, method) cell under ``root``; ``{layout: {method: [{step, loss, grad_norm}]}}``."""
    from megatron_midtrain.data.demo import ensure_demo_assets
    from megatron_midtrain.testing.distributed import run_distributed
    from megatron_midtrain.testing.rollouts import demo_entropy_dirs
    from megatron_midtrain.testing.runs import run_jobs

    # `or`: an empty MIDTRAIN_CACHE (as `MIDTRAIN_CACHE= python ...` sets it) would mean the cwd
    cache = os.environ["MIDTRAIN_CACHE"] = os.environ.get("MIDTRAIN_CACHE") or os.path.join(root, "cache")
    ensure_demo_assets(cache)
    ref, store = os.path.join(root, "reference"), os.path.join(root, "scores")
    run_distributed(run_jobs, 1, [("train", ["train.max_steps=4", "optimizer.lr=1e-2", "run.seed=7", f"run.dir={ref}"])],
                    timeout_s=3600)
    # Scoring tears its process groups down, so it gets a world of its own.
    run_distributed(_score, 1, ["method=remit", f"reference.checkpoint={ref}", f"reference.scores={store}",
                                f"train.max_steps={STEPS}"], timeout_s=3600)
    methods = method_overrides(ref, store, demo_entropy_dirs(cache, os.path.join(root, "entropy")))
    out: dict = {}
    for layout, (world, parallel) in LAYOUTS.items():
        jobs = [("train", parallel + over + [f"train.max_steps={STEPS}", f"run.dir={os.path.join(root, layout, name)}"])
                for name, over in methods.items()]
        results = run_distributed(run_jobs, world, jobs, timeout_s=3600)[0]
        out[layout] = {name: [_deterministic(r) for r in res["records"]] for name, res in zip(methods, results)}
        print(f"{layout}: recorded {', '.join(methods)}", flush=True)
    return out


def machine_fingerprint() -> str:
    """What fp32 bit-for-bit results depend on: architecture, CPU model, ATen's vector ISA,
    intra-op threads and the torch build."""
    import platform

    import torch

    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    return (f"{platform.machine()} | {model} | {torch.backends.cpu.get_cpu_capability()} | "
            f"{torch.get_num_threads()} threads | torch {torch.__version__}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "refactor_baseline.json"))
    parser.add_argument("--this-machine", action="store_true",
                        help="add the record under this machine's fingerprint, keep the rest of --out")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        data = record(root)
    if args.this_machine:
        with open(args.out) as fh:
            out = json.load(fh)
        out.setdefault("machines", {})[machine_fingerprint()] = data
    else:
        out = {"steps": STEPS, "losses": data}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(out, fh, indent=1)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
