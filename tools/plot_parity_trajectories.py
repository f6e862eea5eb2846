#!/usr/bin/env python
"""The layout-parity loss trajectories: the same NTP run at TP1, TP2 and PP2, per model family.

Reads ``ROOT/<family>/ntp/metrics.jsonl`` under one root per layout (the layout worlds of
``tests/test_grad_parity.py`` lay their runs out so: pytest's ``layout_tp1*``, ``layout_tp2*``,
``layout_pp2*`` folders of the core cell set) and draws, for each family found under all of
them, the loss against step (top) and the relative loss difference to TP1 on a log scale
(bottom), with the test's bound (1e-6) and the issue's (1e-4). It prints the worst relative
difference of each family and layout. A layout root need not hold every family (it is drawn
where it does), and ``--against NAME=ROOT`` compares that layout with a TP1 root of its own
(e.g. a TP2 run of an older commit against that commit's TP1).

Example (after ``python -m pytest -q tests/test_grad_parity.py --basetemp /tmp/parity``)::

    python tools/plot_parity_trajectories.py --tp1 /tmp/parity/layout_tp10 \\
        --layout TP2=/tmp/parity/layout_tp20 --layout PP2=/tmp/parity/layout_pp20 \\
        --out docs/parity_trajectories.png

docs/parity_trajectories.png also draws OLMo-2 at TP2 before its QK-norm fix, from the runs kept
in docs/parity/before_qk_norm_fix (commit d6d8e5c~1, the same 30-step settings)::

    --layout "TP2 before the QK-norm fix=docs/parity/before_qk_norm_fix/tp2" \
    --against "TP2 before the QK-norm fix=docs/parity/before_qk_norm_fix/tp1"
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_midtrain.errors import UserError, exit_on_user_error  # noqa: E402

#: Bounds drawn on the difference panels: the test's and the issue's.
BOUNDS = {"test bound 1e-6": 1e-6, "issue bound 1e-4": 1e-4}


def load_losses(root: str, family: str) -> dict[int, float]:
    """``{step: loss}`` of ``root/<family>/ntp``."""
    from megatron_midtrain.training.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(root, family, "ntp")) if "loss" in r}


def families_under(root: str) -> list[str]:
    """The families of ``root`` that have an NTP run with metrics."""
    if not os.path.isdir(root):
        raise UserError(f"{root} is not a directory", "give the folder of one layout's parity runs (ROOT/<family>/ntp)")
    return sorted(f for f in os.listdir(root) if os.path.exists(os.path.join(root, f, "ntp", "metrics.jsonl")))


def relative_differences(ref: dict[int, float], got: dict[int, float]) -> tuple[list[int], list[float]]:
    """Steps both runs logged, and ``|got - ref| / |ref|`` at each."""
    steps = sorted(set(ref) & set(got))
    return steps, [abs(got[s] - ref[s]) / abs(ref[s]) for s in steps]


def plot(tp1: str, layouts: dict[str, str], out: str, against: dict[str, str] | None = None) -> dict:
    """Draw the figure to ``out``; return ``{family: {layout: worst relative difference}}`` (for
    the families of ``tp1`` that some layout has). ``against[name]``: that layout's own TP1 root."""
    against = against or {}
    present = {name: set(families_under(root)) for name, root in layouts.items()}
    fams = [f for f in families_under(tp1) if any(f in have for have in present.values())]
    if not fams:
        raise UserError(f"no family has an ntp run under {tp1} and a --layout root",
                        "point --tp1/--layout at the layout_* folders of a test_grad_parity run")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(fams), figsize=(3.2 * len(fams), 5.6), squeeze=False, sharex=True)
    worst: dict = {}
    for col, fam in enumerate(fams):
        ref = load_losses(tp1, fam)
        top, bottom = axes[0][col], axes[1][col]
        top.plot(sorted(ref), [ref[s] for s in sorted(ref)], label="TP1", lw=2.5, alpha=0.4, color="grey")
        for index, (name, root) in enumerate(layouts.items()):
            if fam not in present[name]:
                continue
            color = f"C{index}"  # one colour per layout in both panels
            got = load_losses(root, fam)
            top.plot(sorted(got), [got[s] for s in sorted(got)], "--", label=name, color=color)
            steps, rel = relative_differences(load_losses(against[name], fam) if name in against else ref, got)
            # An exact match has no place on a log scale: draw it at the panel's floor.
            bottom.semilogy(steps, [max(r, 1e-10) for r in rel], marker=".", label=name, color=color)
            worst.setdefault(fam, {})[name] = max(rel) if rel else float("nan")
        for label, value in BOUNDS.items():
            bottom.axhline(value, color="grey", ls=":", lw=1)
            bottom.annotate(label, (1, value), fontsize=7, color="grey", va="bottom")
        top.set_title(fam)
        bottom.set_xlabel("step")
        bottom.set_ylim(1e-10, 1e-3)
        if col == 0:
            top.set_ylabel("NTP loss")
            bottom.set_ylabel("|loss - TP1| / TP1")
        if col == 0 or any(fam in have for name, have in present.items() if fams[0] not in have):
            top.legend(fontsize=7)  # first column, and columns with a layout the first lacks
            bottom.legend(fontsize=7, loc="upper right")
    fig.suptitle("Loss trajectories at TP2 and PP2 against TP1 (fp32, CPU, gloo)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return worst


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    """``NAME=ROOT`` items as a dict."""
    out = {}
    for item in items:
        name, sep, root = item.partition("=")
        if not sep or not name or not root:
            raise UserError(f"{flag} {item!r} is not NAME=ROOT", f"e.g. {flag} TP2=/tmp/parity/layout_tp20")
        out[name] = root
    return out


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp1", required=True, help="root of the TP1 runs (ROOT/<family>/ntp)")
    parser.add_argument("--layout", action="append", required=True, metavar="NAME=ROOT",
                        help="a layout to compare with TP1, e.g. TP2=/tmp/parity/layout_tp20 (repeatable)")
    parser.add_argument("--against", action="append", default=[], metavar="NAME=ROOT",
                        help="compare layout NAME with this TP1 root instead of --tp1 (repeatable)")
    parser.add_argument("--out", default="parity_trajectories.png", help="the PNG to write")
    args = parser.parse_args(argv)
    layouts, against = _pairs(args.layout, "--layout"), _pairs(args.against, "--against")
    unknown = sorted(set(against) - set(layouts))
    if unknown:
        raise UserError(f"--against names {unknown[0]!r}, which no --layout names", "use the NAME of a --layout")
    worst = plot(args.tp1, layouts, args.out, against)
    print("| family | " + " | ".join(layouts) + " |")
    print("|---|" + "---|" * len(layouts))
    for fam, row in worst.items():
        print(f"| {fam} | " + " | ".join(f"{row[name]:.2e}" if name in row else "–" for name in layouts) + " |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
