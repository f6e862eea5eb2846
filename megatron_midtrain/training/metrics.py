"""Run outputs: metrics.jsonl (one object per step), progress lines, the PNG plot, TensorBoard.

Only rank 0 constructs a :class:`MetricsWriter`. On resume the file is cut back to
the steps covered by the checkpoint, so a run killed after its last save and
resumed never shows a step twice or skips one. That cut happens only under the run dir's lock
(training/run_lock.py): the writer is given the lock and checks it is held, so a second launch
on a live run can never truncate the live run's metrics.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time


class MetricsWriter:
    def __init__(self, run_dir: str, resume_step: int, tensorboard: bool = False, *, lock):
        """``lock``: the run dir's :class:`~megatron_midtrain.training.run_lock.RunLock`, held by this process."""
        if lock is None:
            raise ValueError(f"MetricsWriter({run_dir!r}) needs the run dir's lock: only its holder may cut metrics.jsonl")
        lock.ensure_held()
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._truncate_after(resume_step)
        self._fh = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                print("warning: run.tensorboard=true but tensorboard is not installed (pip install tensorboard)", file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        """Keep only records with ``step <= step`` (atomic rewrite)."""
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if record.get("step", math.inf) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            fh.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record, sort_keys=False) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_metrics(run_dir: str, extra_keys: tuple[str, ...] = ()) -> str | None:
    """Loss (+ validation loss) and method statistics against step, saved as metrics.png."""
    records = read_metrics(run_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    method_keys = sorted({k for r in records for k in r if "/" in k and not k.startswith("val/")} | set(extra_keys))
    panels = 2 + len(method_keys)
    fig, axes = plt.subplots(panels, 1, figsize=(7, 2.4 * panels), sharex=True)
    steps = [r["step"] for r in records]
    axes[0].plot(steps, [r.get("loss", float("nan")) for r in records], label="train loss")
    val = [(r["step"], r["val/loss"]) for r in records if "val/loss" in r]
    if val:
        axes[0].plot(*zip(*val), "o-", label="val loss")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[1].plot(steps, [r.get("lr", float("nan")) for r in records])
    axes[1].set_ylabel("lr")
    for ax, key in zip(axes[2:], method_keys):
        ax.plot(steps, [r.get(key, float("nan")) for r in records])
        ax.set_ylabel(key, fontsize=8)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    out = os.path.join(run_dir, "metrics.png")
    fig.savefig(out + ".tmp.png", dpi=90)
    plt.close(fig)
    os.replace(out + ".tmp.png", out)
    return out


class Progress:
    """Human progress line: step, loss, tokens/s, ETA."""

    def __init__(self, total_steps: int, start_step: int):
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.monotonic()

    def line(self, record: dict) -> str:
        done = record["step"] - self.start_step
        elapsed = time.monotonic() - self.t0
        eta = elapsed / max(done, 1) * (self.total - record["step"])
        parts = [
            f"step {record['step']}/{self.total}",
            f"loss {record['loss']:.4f}",
            f"lr {record['lr']:.2e}",
            f"grad_norm {record['grad_norm']:.3f}",
            f"{record['tokens_per_s']:.0f} tok/s",
            f"ETA {_fmt_time(eta)}",
        ]
        if "rl/reward_mean" in record:  # RL methods: what the rollouts earned
            parts[1:1] = [f"reward {record['rl/reward_mean']:.3f}", f"acc {record['rl/accuracy']:.3f}",
                          f"len {record['rl/response_len']:.1f}", f"gen {record['rl/gen_time_frac']:.0%}"]
        return " | ".join(parts)


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
