"""torch.profiler trace and memory/throughput summary of a few chosen training steps.

Why a fixed window (``run.profiler.start_step`` .. ``+ num_steps - 1``) and not the whole run:
a trace of every step is gigabytes and slows training; a couple of steps after warm-up
(compiled kernels, allocator caches, the data pipeline full) is what shows where a step's
time and memory go. Outputs, under ``<run_dir>/profile/`` per profiled global rank ``R``:

* ``rank<R>_steps<A>-<B>.json``: Chrome trace (open in https://ui.perfetto.dev or
  chrome://tracing); each step is a ``ProfilerStep#<step>`` span named by the training step.
* ``rank<R>_summary.txt``: operator table sorted by self CPU (and CUDA) time, memory columns.
* ``rank<R>_summary.json``: the steps, the mean ``step_time_s`` / ``tokens_per_s`` of those
  steps (from the metrics records), peak CUDA memory and peak RSS, for scripts to compare.

Files are written to a temporary name and renamed, so a kill never leaves half a trace.
A run that resumes after ``start_step`` profiles nothing (the window is not re-run).
"""

from __future__ import annotations

import json
import os
import resource
import sys

import torch

from megatron_midtrain.callbacks.base import Callback


def _global_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _peak_rss_bytes() -> int:
    # ru_maxrss: KiB on Linux, bytes on macOS; a process-lifetime peak (it cannot be reset).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as fh:
        fh.write(text)
    os.replace(path + ".tmp", path)


class TorchProfiler(Callback):
    """Profile steps ``start_step .. start_step + num_steps - 1`` on the ranks in ``ranks``."""

    def __init__(self, cfg):
        """``cfg``: a :class:`~megatron_midtrain.config.schema.ProfilerConfig`."""
        self.cfg = cfg
        self.first, self.last = cfg.start_step, cfg.start_step + cfg.num_steps - 1
        self.active = cfg.start_step > 0
        self.prof = None
        self.records: list[dict] = []

    @classmethod
    def from_config(cls, cfg, rank: int | None = None) -> "TorchProfiler | None":
        """None when ``run.profiler.start_step == 0`` or this global rank is not profiled."""
        pcfg = cfg.run.profiler
        rank = _global_rank() if rank is None else rank
        if pcfg.start_step == 0 or rank not in pcfg.ranks:
            return None
        return cls(pcfg)

    def on_train_start(self, trainer) -> None:
        if trainer.layout.rank not in self.cfg.ranks:
            self.active = False
        elif trainer.step >= self.first:  # resumed at or past the window: never a partial profile
            self.active = False

    def on_step_start(self, trainer, step: int) -> None:
        if not self.active or step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.reset_peak_memory_stats()  # peak of the profiled steps, not of the whole run
        # an always-RECORD schedule: torch adds ProfilerStep#N spans only when a schedule is given
        self.prof = torch.profiler.profile(activities=activities, schedule=lambda _: torch.profiler.ProfilerAction.RECORD,
                                           record_shapes=self.cfg.record_shapes, profile_memory=self.cfg.profile_memory,
                                           with_stack=self.cfg.with_stack)
        self.prof.step_num = step  # the ProfilerStep#N spans carry the training step, not 0, 1, ...
        self.prof.start()

    def on_step_end(self, trainer, record: dict) -> None:
        if self.prof is None:
            return
        self.records.append(record)
        if record["step"] < self.last:
            self.prof.step()
            return
        self.prof.stop()
        self._write(trainer)
        self.prof, self.active = None, False

    def _write(self, trainer) -> None:
        rank, out = trainer.layout.rank, os.path.join(trainer.run_dir, "profile")
        os.makedirs(out, exist_ok=True)
        trace = os.path.join(out, f"rank{rank}_steps{self.first}-{self.last}.json")
        self.prof.export_chrome_trace(trace + ".tmp")
        os.replace(trace + ".tmp", trace)
        averages = self.prof.key_averages()
        tables = [averages.table(sort_by="self_cpu_time_total", row_limit=40)]
        if torch.cuda.is_available():
            tables.append(averages.table(sort_by="self_cuda_time_total", row_limit=40))
        _write_atomic(os.path.join(out, f"rank{rank}_summary.txt"), "\n\n".join(tables) + "\n")

        def mean(key):
            values = [float(r[key]) for r in self.records if isinstance(r.get(key), (int, float))]
            return sum(values) / len(values) if values else None

        summary = {
            "rank": rank,
            "steps": [int(r["step"]) for r in self.records],
            "trace": os.path.basename(trace),
            "step_time_s_mean": mean("step_time_s"),
            "tokens_per_s_mean": mean("tokens_per_s"),
            "peak_cuda_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "peak_rss_bytes": _peak_rss_bytes(),
        }
        _write_atomic(os.path.join(out, f"rank{rank}_summary.json"), json.dumps(summary, indent=1) + "\n")
        if trainer.rank0:
            print(f"[profiler] steps {self.first}-{self.last}: trace {trace}", flush=True)

    def on_train_end(self, trainer) -> None:
        self.close(trainer)

    def close(self, trainer) -> None:
        """Training stopped inside the window (error, exit_at_step): stop, write nothing partial."""
        if self.prof is not None:
            self.prof.stop()
            self.prof, self.active = None, False
            print(f"[profiler] rank {trainer.layout.rank}: training ended inside steps "
                  f"{self.first}-{self.last}; no trace written", file=sys.stderr, flush=True)
