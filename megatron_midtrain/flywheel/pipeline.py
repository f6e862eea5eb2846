"""Cached, resumable training stages of the flywheel benchmark (benchmarks/flywheel.py).

A stage is one ordinary training run: a name and the Hydra overrides that define it. Its run
directory is ``<workdir>/stages/<name>-<hash of the overrides>``, so changing a stage's recipe
(or anything it starts from, which is part of its overrides) trains a new one, and an unchanged
stage that already reached ``train.max_steps`` is reused. An interrupted stage resumes from its
last checkpoint like any run (``train.save_interval``), so rerunning the same command continues
where it stopped. Evaluations are cached the same way, as JSON files keyed by what they read.

Every stage runs in this process (world size 1) and the process groups are kept between stages,
as the demo model stages do: re-creating gloo groups for every run costs more than the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Progress:
    """Stage counter with an ETA from the mean duration of the stages run so far, per kind."""

    total: int
    done: int = 0
    spent: dict = field(default_factory=dict)  # kind -> [seconds of stages that ran]
    pending: dict = field(default_factory=dict)  # kind -> stages of that kind still to come
    started: float = field(default_factory=time.perf_counter)

    def expect(self, kind: str, count: int = 1) -> None:
        self.pending[kind] = self.pending.get(kind, 0) + count

    def finish(self, kind: str, label: str, seconds: float | None) -> None:
        self.done += 1
        self.pending[kind] = max(0, self.pending.get(kind, 0) - 1)
        if seconds is not None:
            self.spent.setdefault(kind, []).append(seconds)
        known = [s for v in self.spent.values() for s in v]
        fallback = sum(known) / len(known) if known else 0.0
        eta = sum(n * (sum(self.spent[k]) / len(self.spent[k]) if self.spent.get(k) else fallback)
                  for k, n in self.pending.items())
        took = "cached" if seconds is None else f"{seconds:.0f}s"
        log(f"[{self.done}/{self.total}] {label}: {took}; elapsed {_clock(time.perf_counter() - self.started)}, "
            f"ETA ~{_clock(eta)}")


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def log(message: str) -> None:
    print(f"[flywheel] {message}", file=sys.stderr, flush=True)


class Stages:
    """Runs (or reuses) named training stages under ``workdir``."""

    def __init__(self, workdir: str, progress: Progress, common: list[str]):
        """``common``: overrides every stage gets first (its own overrides win)."""
        self.root = os.path.join(workdir, "stages")
        self.evals = os.path.join(workdir, "evals")
        self.progress = progress
        self.common = list(common)
        os.makedirs(self.root, exist_ok=True)
        os.makedirs(self.evals, exist_ok=True)

    def run_dir(self, name: str, overrides: list[str]) -> str:
        return os.path.join(self.root, f"{name}-{_digest(self.common + overrides)}")

    def train(self, name: str, overrides: list[str], kind: str) -> str:
        """The run directory of stage ``name``, trained (or resumed) to its ``train.max_steps``."""
        from megatron_midtrain.config.loader import load_config
        from megatron_midtrain.training import checkpoint as ckpt
        from megatron_midtrain.training.trainer import Trainer

        run_dir = self.run_dir(name, overrides)
        cfg = load_config(self.common + overrides + [f"run.dir={run_dir}"])
        if ckpt.latest_checkpoint(ckpt.checkpoint_root(run_dir)) == cfg.train.max_steps:
            self.progress.finish(kind, name, None)
            return run_dir
        log(f"stage {name}: {cfg.method.name}, {cfg.train.max_steps} steps -> {run_dir}")
        start = time.perf_counter()
        trainer = Trainer(cfg)
        try:
            trainer.train()
        finally:
            trainer.close(keep_distributed=True)
        if trainer.stop_reason is not None:  # SIGTERM/SIGUSR1: checkpoint saved, rerun to resume
            log(f"stopped in stage {name} ({trainer.stop_reason}); rerun the same command to resume")
            raise SystemExit(1)
        self.progress.finish(kind, name, time.perf_counter() - start)
        return run_dir

    def evaluate(self, name: str, key: list, kind: str, compute) -> dict:
        """``compute()`` (a JSON-able dict), cached under ``evals/<name>-<hash of key>.json``."""
        path = os.path.join(self.evals, f"{name}-{_digest(key)}.json")
        if os.path.isfile(path):
            self.progress.finish(kind, name, None)
            with open(path) as f:
                return json.load(f)
        start = time.perf_counter()
        result = compute()
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, path)  # never a half-written cache entry
        self.progress.finish(kind, name, time.perf_counter() - start)
        return result
