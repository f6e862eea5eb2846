"""Exact resume, crash (SIGKILL) resume, and TP resharding of checkpoints (CPU, fp32)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_midtrain.testing.distributed import run_distributed
from megatron_midtrain.testing.runs import train_and_report, validation_loss, with_test_defaults
from megatron_midtrain.training.checkpoint import complete_checkpoints
from megatron_midtrain.training.metrics import read_metrics

STEPS = 10


def _run(world, overrides):
    return run_distributed(train_and_report, world, overrides)[0]["records"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    return _run(1, [f"train.max_steps={STEPS}", f"run.dir={run_dir}"])


def test_clean_stop_and_resume_is_exact(uninterrupted, tmp_path):
    common = [f"train.max_steps={STEPS}", f"run.dir={tmp_path}"]
    first = _run(1, common + ["train.exit_at_step=5"])
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5]
    assert complete_checkpoints(os.path.join(tmp_path, "checkpoints")) == [5]
    resumed = _run(1, common)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for ref, got in zip(uninterrupted, resumed):
        # Bitwise: same data order, optimizer state, LR schedule and RNG after the resume.
        assert (got["loss"], got["grad_norm"], got["lr"]) == (ref["loss"], ref["grad_norm"], ref["lr"]), ref["step"]


def test_sigkill_resumes_from_last_complete_checkpoint(uninterrupted, tmp_path):
    overrides = with_test_defaults([f"train.max_steps={STEPS}", f"run.dir={tmp_path}", "train.save_interval=3"])
    cmd = [sys.executable, "-m", "megatron_midtrain.train", *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    try:
        # Kill mid-training, after the step-6 checkpoint but before the end of the run.
        while time.monotonic() < deadline and proc.poll() is None:
            steps = [r["step"] for r in read_metrics(str(tmp_path))] if metrics.exists() else []
            if steps and steps[-1] >= 7:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed_at = read_metrics(str(tmp_path))[-1]["step"]
    assert killed_at < STEPS
    last_ckpt = complete_checkpoints(os.path.join(tmp_path, "checkpoints"))[-1]
    assert last_ckpt in (6, 9) and last_ckpt <= killed_at

    resumed = _run(1, [f"train.max_steps={STEPS}", f"run.dir={tmp_path}", "train.save_interval=3"])
    steps = [r["step"] for r in resumed]
    assert steps == list(range(1, STEPS + 1)), steps  # no duplicated or missing step
    for ref, got in zip(uninterrupted, resumed):
        assert got["loss"] == ref["loss"], ref["step"]


@pytest.mark.parametrize("save_tp,load_tp", [(2, 1), (1, 2)])
def test_checkpoint_reshards_between_tp_sizes(save_tp, load_tp, tmp_path):
    common = [f"run.dir={tmp_path}", "train.max_steps=4", "train.eval_interval=4", "train.eval_batches=2"]
    records = _run(save_tp, common + [f"parallel.tp={save_tp}"])
    saved_val = records[-1]["val/loss"]
    loaded_val = run_distributed(validation_loss, load_tp, common + [f"parallel.tp={load_tp}"])[0]
    print(f"TP{save_tp} checkpoint: val loss {saved_val!r} at TP{save_tp}, {loaded_val!r} at TP{load_tp}")
    assert loaded_val == pytest.approx(saved_val, rel=1e-6)
