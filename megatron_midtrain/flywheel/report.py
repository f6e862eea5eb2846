"""The flywheel's outputs: results.json, results.md (mean ± s.e. over seeds, difference from NTP)
and flywheel.png (bars with error bars, learning curves, ReMiT mechanism over training)."""

from __future__ import annotations

import json
import math
import os

import numpy as np

#: (key, label, higher is better) of every reported metric; keys index flat run metrics.
METRICS = [
    ("val_loss_math", "val loss, arithmetic", False),
    ("val_loss_prose", "val loss, prose", False),
    ("nta_high_math", "next-token acc., high-entropy, arithmetic", True),
    ("nta_high_prose", "next-token acc., high-entropy, prose", True),
    ("nta_math", "next-token acc., arithmetic", True),
    ("nta_prose", "next-token acc., prose", True),
    ("accuracy_mid", "held-out accuracy after mid-training", True),
    ("accuracy_post_sft", "held-out accuracy after post-training SFT", True),
    ("accuracy_post", "held-out accuracy after SFT + GRPO", True),
    ("step_time_s", "mid-training step time (s, median)", False),
]


def flat(run: dict) -> dict:
    t = run["tokens"]
    out = {f"val_loss_{d}": t[d]["val_loss"] for d in t}
    out.update({f"nta_high_{d}": t[d]["next_token_acc_high_entropy"] for d in t})
    out.update({f"nta_{d}": t[d]["next_token_acc"] for d in t})
    for k in ("accuracy_mid", "accuracy_post_sft", "accuracy_post", "step_time_s"):
        if k in run:
            out[k] = run[k]
    return out


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n); NaN for one value)."""
    a = np.asarray(values, dtype=float)
    se = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else float("nan")
    return float(a.mean()), se


def summarise(results: dict) -> dict:
    """Per method and metric: mean, s.e., n, and the seed-paired difference from NTP (mean, s.e.)."""
    by_method: dict = {}
    for run in results["runs"]:
        by_method.setdefault(run["method"], {})[run["seed"]] = flat(run)
    ntp = by_method.get("ntp", {})
    table = {}
    for method, seeds in by_method.items():
        row = {}
        for key, _, _ in METRICS:
            vals = [seeds[s][key] for s in sorted(seeds) if key in seeds[s]]
            if not vals:
                continue
            m, se = mean_se(vals)
            cell = {"mean": m, "se": se, "n": len(vals)}
            paired = [seeds[s][key] - ntp[s][key] for s in sorted(seeds) if s in ntp and key in ntp[s] and key in seeds[s]]
            if method != "ntp" and paired:
                cell["diff"], cell["diff_se"] = mean_se(paired)
            row[key] = cell
        table[method] = row
    return table


def _fmt(key: str, value: float) -> str:
    if key.startswith(("accuracy", "nta")):
        return f"{100 * value:.1f}"
    return f"{value:.3f}" if key != "step_time_s" else f"{value:.2f}"


def _cell(key: str, c: dict) -> str:
    text = _fmt(key, c["mean"]) + ("" if math.isnan(c["se"]) else f" ± {_fmt(key, c['se'])}")
    if "diff" in c:
        se = "" if math.isnan(c["diff_se"]) else f" ± {_fmt(key, c['diff_se'])}"
        text += f" ({'+' if c['diff'] >= 0 else '−'}{_fmt(key, abs(c['diff']))}{se})"
    return text


def markdown(results: dict, table: dict, header: str) -> str:
    methods = list(table)
    lines = [header, "",
             "Mean ± standard error over seeds (n per cell); in brackets the seed-paired difference from NTP ± its s.e. "
             "Accuracies in %.", "",
             "| metric | " + " | ".join(f"{m} (n={max(c['n'] for c in table[m].values())})" for m in methods) + " |",
             "|---" * (len(methods) + 1) + "|"]
    for key, label, better in METRICS:
        if not any(key in table[m] for m in methods):
            continue
        arrow = "↑" if better else "↓"
        lines.append(f"| {label} {arrow} | " + " | ".join(_cell(key, table[m][key]) if key in table[m] else "–" for m in methods) + " |")
    refs = results["references"]
    lines += ["", f"Base model: held-out accuracy {100 * results['base_accuracy']:.1f}%; SFT-only reference "
              f"{100 * refs['sft']['accuracy']:.1f}%; RL reference {100 * refs['rl']['accuracy']:.1f}% "
              f"(greedy, {results['recipe']['eval_problems']} held-out problems)."]
    for name, key in (("base", None), ("sft_ref", "sft_ref"), ("rl_ref", "rl_ref")):
        t = results["base"] if key is None else refs["tokens"][key]
        lines.append(f"- {name}: val loss arithmetic {t['math']['val_loss']:.3f}, prose {t['prose']['val_loss']:.3f}")
    mech = [r for r in results["runs"] if "mechanism" in r]
    if mech:
        lines += ["", "ReMiT mechanism (held-out text, seed " + str(mech[0]["seed"]) + "): mean weight w and shares at the clip "
                  "bounds, at the start (the base against the reference) and at the end of mid-training.", "",
                  "| run | step | w arith. | w prose | w numbers / rest (arith.) | w answers / rest (arith.) | at 1−ε arith. / prose "
                  "| at 1+ε arith. / prose | Δ mean arith. / prose |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in mech:
            for row in (r["mechanism"][0], r["mechanism"][-1]):
                m, p = row["math"], row["prose"]
                lines.append(f"| {r['method']} | {row['step']} | {m['w_mean']:.3f} | {p['w_mean']:.3f} | "
                             f"{m['w_numbers']:.3f} / {m['w_other_than_numbers']:.3f} | {m['w_answers']:.3f} / {m['w_other_than_answers']:.3f} | "
                             f"{100 * m['frac_low']:.0f}% / {100 * p['frac_low']:.0f}% | {100 * m['frac_high']:.0f}% / {100 * p['frac_high']:.0f}% | "
                             f"{m['delta_mean']:+.2f} / {p['delta_mean']:+.2f} |")
    lines += ["", f"Wall time: {results['wall_s'] / 60:.1f} min. Command: `{results['command']}`. Machine: {results['machine']}."]
    return "\n".join(lines) + "\n"


def plot(results: dict, table: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, _, _ in METRICS if k != "step_time_s" and any(k in table[m] for m in table)]
    labels = {k: lab for k, lab, _ in METRICS}
    methods = list(table)
    cols = 4
    rows = math.ceil((len(keys) + 2) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows))
    axes = axes.ravel()
    for ax, key in zip(axes, keys):
        ms = [m for m in methods if key in table[m]]
        means = [table[m][key]["mean"] for m in ms]
        errs = [0 if math.isnan(table[m][key]["se"]) else table[m][key]["se"] for m in ms]
        ax.bar(range(len(ms)), means, yerr=errs, capsize=3, color=["#888" if m == "ntp" else "C0" for m in ms])
        ax.set_xticks(range(len(ms)), ms, rotation=45, ha="right", fontsize=7)
        ax.set_title(labels[key], fontsize=8)
        lo, hi = min(means) - 2 * max(errs + [0]), max(means) + 2 * max(errs + [0])
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
    ax = axes[len(keys)]
    for method in methods:
        curves = [[x["val/loss"] for x in r["curve"] if "val/loss" in x] for r in results["runs"] if r["method"] == method]
        steps = [x["step"] for x in next(r for r in results["runs"] if r["method"] == method)["curve"] if "val/loss" in x]
        if curves and steps and all(len(c) == len(steps) for c in curves):
            ax.plot(steps, np.mean(curves, axis=0), label=method, marker=".")
    ax.set_title("validation loss (blend) during mid-training", fontsize=8)
    ax.legend(fontsize=6)
    ax = axes[len(keys) + 1]
    for r in (r for r in results["runs"] if "mechanism" in r):
        steps = [row["step"] for row in r["mechanism"]]
        ax.plot(steps, [row["math"]["w_mean"] for row in r["mechanism"]], label=f"{r['method']} arith.")
        ax.plot(steps, [row["prose"]["w_mean"] for row in r["mechanism"]], "--", label=f"{r['method']} prose")
    ax.set_title("ReMiT mean weight on held-out text", fontsize=8)
    ax.legend(fontsize=6)
    for extra in axes[len(keys) + 2:]:
        extra.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, out_dir: str, header: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    table = summarise(results)
    results = dict(results, summary=table)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(results, table, header))
    plot(results, table, os.path.join(out_dir, "flywheel.png"))
    return table
