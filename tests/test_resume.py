"""Exact resume, crash (SIGKILL) resume, TP resharding of checkpoints, resharded resumes that keep
training (TP2 -> TP1, PP2 -> PP1: the optimizer state reshards) and async saves (CPU, fp32)."""

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


# --------------------------------------------------------------------------- resharded resumes
RESHARD_STEPS = 5  # 2 steps, a checkpoint, then 3 more after the resume
SAVED_AT = 2


def _copy_run(src: str, dst: str) -> str:
    import shutil

    import torch.distributed as dist

    if dist.get_rank() == 0:
        shutil.copytree(src, dst)
    dist.barrier()
    return dst


def _new_layout() -> None:
    """Drop megatron's TP/PP groups (not the world) so the next Trainer builds another layout."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.barrier()


def _async_save_probe(overrides: list[str]) -> dict:
    """Train 3 steps saving asynchronously after each (a save waits for the one in flight; the
    loop polls; the end of training finalises), then save once more: what is on disk before and
    after that last save is finalised."""
    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.testing.runs import with_test_defaults
    from megatron_midtrain.training import checkpoint as ckpt
    from megatron_midtrain.training.trainer import Trainer

    extra = ["train.async_save=true", "train.max_steps=3", "train.save_interval=1"]
    cfg = load_config(with_test_defaults(overrides + extra))
    trainer = Trainer(cfg)
    root = ckpt.checkpoint_root(cfg.run.dir)
    partial = os.path.join(root, "iter_0000003.partial")

    def on_disk():
        return {"pending": ckpt.pending_async_saves(), "complete": complete_checkpoints(root),
                "partial": os.path.isdir(partial), "partial_meta": os.path.isfile(os.path.join(partial, ckpt.META))}

    try:
        trainer.train()
        trained = on_disk()
        trainer.save()  # step 3 again: the old iter_0000003 stays the complete one until published
        before = on_disk()
        ckpt.finalize_async_saves()
        return {"trained": trained, "before": before, "after": on_disk()}
    finally:
        trainer.close(keep_distributed=True)


def reshard_job(root: str) -> dict:
    """Rank job, world 2: checkpoints at TP2 (async save) and PP2 (sync), each resumed at its own
    layout, then, in the same world re-grouped as TP1 PP1 (DP2), resumed again."""
    common = [f"train.max_steps={RESHARD_STEPS}", "optimizer.lr=1e-2"]
    src = {"tp": ["parallel.tp=2", "train.async_save=true"], "pp": ["parallel.pp=2"]}
    out, runs = {}, {}

    def train(name, layout_overrides, run_dir, *extra):
        result = train_and_report(layout_overrides + common + [f"run.dir={run_dir}", *extra], keep_distributed=True)
        out[name] = result.get("records")

    for i, (kind, layout_overrides) in enumerate(src.items()):
        if i:
            _new_layout()
        saved = os.path.join(root, kind, "saved")
        train(f"{kind}_uninterrupted", layout_overrides, os.path.join(root, kind, "uninterrupted"))
        if kind == "tp":
            out["async_probe"] = _async_save_probe(layout_overrides + [f"run.dir={os.path.join(root, 'probe')}"])
        train(f"{kind}_saved", layout_overrides, saved, f"train.exit_at_step={SAVED_AT}")
        runs[kind] = (_copy_run(saved, os.path.join(root, kind, "same")), _copy_run(saved, os.path.join(root, kind, "one")))
        train(f"{kind}2_resumed", layout_overrides, runs[kind][0])
    _new_layout()
    for kind in src:
        train(f"{kind}1_resumed", [], runs[kind][1])
    return out


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    return run_distributed(reshard_job, 2, str(tmp_path_factory.mktemp("reshard")), timeout_s=1800)[0]


def _after_resume(records):
    return [r for r in records if r["step"] > SAVED_AT]


@pytest.mark.parametrize("kind", ["tp", "pp"])
def test_resharded_resume_continues_with_the_same_losses(resharded, kind):
    """A checkpoint saved at TP2 (PP2) and resumed at TP1 (PP1) takes the same 3 steps as one
    resumed at TP2 (PP2): the optimizer state (Adam moments, step counts) was resharded.

    The TP2 (PP2) resume is first checked against the uninterrupted run (bitwise), so two
    resumes that lost the optimizer state alike cannot pass as equal."""
    same, one = _after_resume(resharded[f"{kind}2_resumed"]), _after_resume(resharded[f"{kind}1_resumed"])
    full = _after_resume(resharded[f"{kind}_uninterrupted"])
    assert [r["step"] for r in same] == [r["step"] for r in one] == [3, 4, 5]
    assert [(r["loss"], r["grad_norm"]) for r in same] == [(r["loss"], r["grad_norm"]) for r in full]
    for a, b in zip(same, one):
        print(f"{kind.upper()}2 checkpoint, step {a['step']}: loss {a['loss']!r} at {kind.upper()}2, {b['loss']!r} at "
              f"{kind.upper()}1 (rel {abs(b['loss'] - a['loss']) / abs(a['loss']):.1e}); grad norm {a['grad_norm']!r} / "
              f"{b['grad_norm']!r} (rel {abs(b['grad_norm'] - a['grad_norm']) / abs(a['grad_norm']):.1e})")
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), a["step"]


def test_async_saved_checkpoint_resumes_exactly(resharded):
    """train.async_save: the checkpoint is complete only once finalised, and resuming from an
    async-saved checkpoint continues bit for bit like the uninterrupted (sync-saving) run."""
    probe = resharded["async_probe"]
    done = {"pending": 0, "complete": [2, 3], "partial": False, "partial_meta": False}
    assert probe["trained"] == done, probe
    assert probe["before"] == {"pending": 1, "complete": [2, 3], "partial": True, "partial_meta": False}, probe
    assert probe["after"] == done, probe
    resumed, full = _after_resume(resharded["tp2_resumed"]), _after_resume(resharded["tp_uninterrupted"])
    assert [(r["loss"], r["grad_norm"]) for r in resumed] == [(r["loss"], r["grad_norm"]) for r in full]


def _train_recording_checkpoint_warnings(overrides):
    import logging

    seen = []

    class Record(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logging.getLogger("megatron.core.dist_checkpointing").addHandler(Record(level=logging.WARNING))
    records = train_and_report(overrides).get("records") or []  # rank 0 reports the records
    return {"warnings": seen, "steps": [r["step"] for r in records]}


@pytest.mark.parametrize("async_save", ["false", "true"])
def test_saves_at_dp2_print_no_overwrite_warning(async_save, tmp_path):
    """Every save used to log megatron's "Overwriting old incomplete / corrupted checkpoint..."
    (the per-rank RNG files were written into the directory before the save began)."""
    out = run_distributed(_train_recording_checkpoint_warnings, 2,
                          [f"run.dir={tmp_path}", "train.max_steps=2", "train.save_interval=1",
                           f"train.async_save={async_save}"])
    assert out[0]["steps"] == [1, 2]
    assert complete_checkpoints(os.path.join(tmp_path, "checkpoints")) == [1, 2]
    for rank in out:
        assert not [w for w in rank["warnings"] if "Overwriting" in w], rank["warnings"]
    assert all(os.path.exists(os.path.join(tmp_path, "checkpoints", f"iter_{s:07d}", "rng", f"rank{r:05d}.pt"))
               for s in (1, 2) for r in (0, 1))
