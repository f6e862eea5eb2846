"""TorchProfiler: a trace of exactly the chosen steps, a summary, nothing on unprofiled ranks."""

import json
import os
import time
from types import SimpleNamespace

import pytest
import torch

from megatron_midtrain.callbacks.profiler import TorchProfiler
from megatron_midtrain.config.schema import MidtrainConfig, ProfilerConfig, RunConfig
from megatron_midtrain.errors import UserError


def _cfg(**profiler):
    return MidtrainConfig(run=RunConfig(profiler=ProfilerConfig(**profiler)))


def _trainer(run_dir, rank=0, step=0):
    return SimpleNamespace(cfg=None, rank0=rank == 0, run_dir=str(run_dir), step=step, layout=SimpleNamespace(rank=rank))


def _fake_loop(callbacks, trainer, max_steps):
    """The trainer's hook order; each step runs a small matmul inside a span named by its step."""
    for cb in callbacks:
        cb.on_train_start(trainer)
    x = torch.randn(64, 64)
    for step in range(trainer.step + 1, max_steps + 1):
        for cb in callbacks:
            cb.on_step_start(trainer, step)
        t0 = time.perf_counter()
        with torch.profiler.record_function(f"fake_step_{step}"):
            for _ in range(3):
                x = torch.tanh(x @ x)
        dt = time.perf_counter() - t0
        record = {"step": step, "loss": float(x.mean()), "lr": 1e-3, "grad_norm": 1.0,
                  "step_time_s": dt, "tokens_per_s": 100.0 * step}
        for cb in callbacks:
            cb.on_step_end(trainer, record)
        trainer.step = step
    for cb in callbacks:
        cb.on_train_end(trainer)
        cb.close(trainer)


def test_profiles_only_the_chosen_steps(tmp_path, capsys):
    prof = TorchProfiler.from_config(_cfg(start_step=3, num_steps=2, record_shapes=True), rank=0)
    assert prof is not None
    _fake_loop([prof], _trainer(tmp_path), max_steps=6)

    out = tmp_path / "profile"
    assert sorted(os.listdir(out)) == ["rank0_steps3-4.json", "rank0_summary.json", "rank0_summary.txt"]
    trace = json.loads((out / "rank0_steps3-4.json").read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e.get("name", "") for e in events}
    assert any(n.startswith("aten::mm") for n in names), "no matmul recorded"
    assert {n for n in names if n.startswith("fake_step_")} == {"fake_step_3", "fake_step_4"}
    assert {n for n in names if n.startswith("ProfilerStep#")} == {"ProfilerStep#3", "ProfilerStep#4"}

    summary = json.loads((out / "rank0_summary.json").read_text())
    assert summary["steps"] == [3, 4]
    assert summary["tokens_per_s_mean"] == pytest.approx(350.0)
    assert summary["step_time_s_mean"] > 0
    assert summary["peak_rss_bytes"] > 10 * 2**20
    assert summary["peak_cuda_memory_bytes"] is None if not torch.cuda.is_available() else summary["peak_cuda_memory_bytes"] > 0
    table = (out / "rank0_summary.txt").read_text()
    assert "aten::mm" in table and "CPU Mem" in table
    assert "rank0_steps3-4.json" in capsys.readouterr().out


def test_unprofiled_rank_and_off(tmp_path):
    assert TorchProfiler.from_config(_cfg(start_step=0)) is None
    assert TorchProfiler.from_config(_cfg(start_step=2, ranks=[0]), rank=1) is None
    # constructed anyway (e.g. from the config on another rank): the trainer's rank gates it too
    prof = TorchProfiler(ProfilerConfig(start_step=2, ranks=[0]))
    _fake_loop([prof], _trainer(tmp_path, rank=1), max_steps=3)
    assert not (tmp_path / "profile").exists()


def test_resume_after_the_window_does_nothing(tmp_path):
    prof = TorchProfiler.from_config(_cfg(start_step=2, num_steps=2), rank=0)
    _fake_loop([prof], _trainer(tmp_path, step=4), max_steps=6)
    assert not (tmp_path / "profile").exists()


def test_stopped_inside_the_window(tmp_path, capsys):
    prof = TorchProfiler.from_config(_cfg(start_step=2, num_steps=3), rank=0)
    _fake_loop([prof], _trainer(tmp_path), max_steps=3)  # ends at step 3 of 2-4
    assert prof.prof is None and not (tmp_path / "profile").exists()
    assert "no trace written" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [{"start_step": -1}, {"num_steps": 0}, {"start_step": 1, "ranks": []}])
def test_config_checks(bad):
    with pytest.raises(UserError):
        ProfilerConfig(**bad)
