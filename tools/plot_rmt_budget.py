#!/usr/bin/env python
"""RMT's dynamic token budget at work: response length vs budget, and accuracy, against step.

Reads ``RUN_DIR/metrics.jsonl`` (one or more run dirs) and draws two panels:

* top: the mean rollout length ``rl/response_len`` (solid) and the token budget ``rl/budget``
  (dashed) of each step;
* bottom: the rollouts' prefix-match accuracy ``rl/accuracy`` and length reward
  ``rl/length_reward``.

It also prints the means over the first and last ``--frac`` (default 10%) of the steps.

Example::

    python tools/plot_rmt_budget.py runs/rmt-budget-demo --out docs/rmt_budget_demo.png
    python tools/plot_rmt_budget.py runs/a runs/b --label eod --label "stop ." --out cmp.png
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_midtrain.errors import UserError, exit_on_user_error  # noqa: E402

KEYS = ("rl/budget", "rl/response_len", "rl/accuracy", "rl/length_reward")


def load_run(run_dir: str) -> list[dict]:
    """The per-step records of an RMT run that hold every key of :data:`KEYS`."""
    from megatron_midtrain.training.metrics import read_metrics

    records = [r for r in read_metrics(run_dir) if all(k in r for k in KEYS)]
    if not records:
        raise UserError(f"{run_dir} has no metrics.jsonl records with {', '.join(KEYS)}",
                        "give the run dir of a method=rmt run (e.g. experiment=rmt_budget_demo)")
    return records


def start_end(records: list[dict], frac: float = 0.1) -> dict:
    """``{key: (mean over the first frac of the steps, mean over the last frac)}`` (at least one step each)."""
    n = max(1, round(len(records) * frac))
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return {k: (mean(records[:n], k), mean(records[-n:], k)) for k in KEYS}


def plot(runs: list[tuple[str, list[dict]]], out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_len, ax_acc) = plt.subplots(2, 1, figsize=(6.4, 5.2), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, records) in enumerate(runs):
        c = colors[i % len(colors)]
        steps = [r["step"] for r in records]
        tag = f" ({label})" if len(runs) > 1 else ""
        ax_len.plot(steps, [r["rl/response_len"] for r in records], color=c, label=f"mean response length{tag}")
        ax_acc.plot(steps, [r["rl/accuracy"] for r in records], color=c, label=f"prefix-match accuracy{tag}")
        ax_acc.plot(steps, [r["rl/length_reward"] for r in records], color=c, ls=":", label=f"length reward{tag}")
    budget = runs[0][1]
    ax_len.step([r["step"] for r in budget], [r["rl/budget"] for r in budget], where="post", color="k", ls="--",
                label="token budget $B_t$")
    ax_len.set_ylabel("tokens")
    ax_len.set_ylim(bottom=0)
    ax_len.legend(fontsize=8)
    ax_acc.set_ylabel("per rollout")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.set_xlabel("step")
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


@exit_on_user_error
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run dir(s) holding metrics.jsonl")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--label", action="append", default=None, help="legend label per run (default: the dir name)")
    ap.add_argument("--frac", type=float, default=0.1, help="share of steps averaged for the start/end figures")
    args = ap.parse_args(argv)
    labels = args.label or [os.path.basename(os.path.normpath(d)) for d in args.run_dirs]
    if len(labels) != len(args.run_dirs):
        raise UserError(f"{len(labels)} --label for {len(args.run_dirs)} run dirs", "give one --label per RUN_DIR, or none")
    runs = [(label, load_run(d)) for label, d in zip(labels, args.run_dirs)]
    for label, records in runs:
        se = start_end(records, args.frac)
        print(f"{label}: {len(records)} steps; first/last {args.frac:.0%}: "
              + ", ".join(f"{k[3:]} {a:.3f} -> {b:.3f}" for k, (a, b) in se.items()))
    print(plot(runs, args.out))


if __name__ == "__main__":
    main()
