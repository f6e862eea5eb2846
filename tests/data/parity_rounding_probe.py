#!/usr/bin/env python
"""How far fp32 rounding alone carries a run: the rounding floor of the layout-parity tests.

A test-side measurement script (it drives megatron_midtrain.testing, which tools/ may not import).

Runs the same training run (fixed rollouts for the RL methods, as tests/test_grad_parity.py does)
at TP1, then variants of it, and prints each variant's worst per-parameter relative gradient
difference from the TP1 run after steps 1 and 3, and where the step-1 *parameter* difference sits:

* ``nudged``: TP1 from weights one ulp away (the tests' rounding control);
* ``kernels=X``: TP1 with ``ATEN_CPU_CAPABILITY=X`` (e.g. avx2 on an AVX-512 machine: the same
  code and layout, other vector kernels);
* ``--layout``: another layout (e.g. ``--layout parallel.tp=2 --world 2``).

Example (the figures of tests/test_grad_parity.py's docstring; llama GRPO as the parity cell)::

    python tests/data/parity_rounding_probe.py --kernels avx2 --layout parallel.tp=2 --world 2 -- \\
        method=grpo method.eval_problems=0 method.answer_format=plain train.max_steps=3 \\
        method.prompts_per_step=4 method.group_size=4 method.rollout_micro_batch_size=4 \\
        method.max_new_tokens=8 optimizer.lr=1e-3 schedule.warmup_steps=0
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root

#: Elements with a step-1 gradient below this are where Adam's ``g / (|g| + eps)`` is steep.
TINY_GRAD = 1e-7


def capture_run(overrides: list[str], out: str, nudge: bool) -> dict:
    """Rank job: train with ``overrides``; rank 0 saves the full gradients after steps 1 and 3
    and the full parameters after step 1 to ``out``."""
    import torch

    from megatron_midtrain.testing.callbacks import CaptureGradients, NudgeWeights
    from megatron_midtrain.testing.runs import train_and_report

    grads, params = CaptureGradients((1, 3)), CaptureGradients((1,), params=True)
    result = train_and_report(overrides, callbacks=([NudgeWeights()] if nudge else []) + [grads, params],
                              fixed_rollouts=True)
    if result:
        torch.save({"grads": grads.captured, "params": params.captured[1]}, out)
    return {}


def run_variant(name: str, overrides: list[str], world: int, workdir: str, nudge: bool = False,
                kernels: str | None = None) -> dict:
    """One variant in its own spawned world; returns what rank 0 saved."""
    import torch

    from megatron_midtrain.testing.distributed import run_distributed

    out = os.path.join(workdir, f"{name}.pt")
    saved = os.environ.get("ATEN_CPU_CAPABILITY")
    if kernels:
        os.environ["ATEN_CPU_CAPABILITY"] = kernels  # read by the spawned ranks' torch at import
    try:
        run_distributed(capture_run, world, overrides + [f"run.dir={os.path.join(workdir, name)}"], out, nudge,
                        timeout_s=3600)
    finally:
        if kernels and saved is None:
            del os.environ["ATEN_CPU_CAPABILITY"]
        elif kernels:
            os.environ["ATEN_CPU_CAPABILITY"] = saved
    return torch.load(out, weights_only=False)


def tiny_gradient_share(base: dict, other: dict) -> float:
    """Share of the squared step-1 parameter difference on elements whose TP1 step-1 gradient is
    below :data:`TINY_GRAD`."""
    total = tiny = 0.0
    for key, p in base["params"].tensors.items():
        diff2 = (other["params"].tensors[key] - p) ** 2
        total += diff2.sum().item()
        tiny += diff2[base["grads"][1].tensors[key].abs() < TINY_GRAD].sum().item()
    return tiny / total if total else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernels", action="append", default=[], help="a TP1 variant with ATEN_CPU_CAPABILITY=X")
    parser.add_argument("--layout", action="append", default=[], help="an override of the layout variant (repeatable)")
    parser.add_argument("--world", type=int, default=2, help="world size of the layout variant")
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*", help="training overrides (after --)")
    args = parser.parse_args(argv)

    from megatron_midtrain.testing.grads import compare
    from megatron_midtrain.testing.runs import with_test_defaults

    workdir = args.workdir or tempfile.mkdtemp(prefix="parity_probe_")
    overrides = with_test_defaults(args.overrides)
    base = run_variant("tp1", overrides, 1, workdir)
    variants = {"nudged (TP1, one ulp away)": run_variant("nudged", overrides, 1, workdir, nudge=True)}
    for kernels in args.kernels:
        variants[f"kernels={kernels} (TP1)"] = run_variant(f"kernels_{kernels}", overrides, 1, workdir, kernels=kernels)
    if args.layout:
        variants[" ".join(args.layout)] = run_variant("layout", overrides + args.layout, args.world, workdir)
    print(f"| variant against TP1 | step 1 | step 3 | share of the step-1 parameter difference where abs(g) < {TINY_GRAD:g} |")
    print("|---|---|---|---|")
    for name, run in variants.items():
        worst = {step: max(compare(run["grads"][step], base["grads"][step]).values()) for step in (1, 3)}
        print(f"| {name} | {worst[1]:.2e} | {worst[3]:.2e} | {tiny_gradient_share(base, run):.1%} |")
    print(f"runs in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
