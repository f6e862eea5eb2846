"""WandbLogger in W&B offline mode (no network): the .wandb file holds the logged history."""

import glob
import importlib.util
import json
import os
import re
import struct
import sys
from types import SimpleNamespace

import pytest

from megatron_midtrain.callbacks.wandb import ID_FILE, WandbLogger
from megatron_midtrain.config.schema import MidtrainConfig, NTPMethodConfig, RunConfig, WandbConfig
from megatron_midtrain.errors import UserError

# wandb is in the dev extra (CI has it); the config and missing-package tests run without it
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason='needs pip install -e ".[wandb]"')


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var, sub in (("WANDB_DIR", "wandb_default"), ("WANDB_CONFIG_DIR", "wandb_config"),
                     ("WANDB_CACHE_DIR", "wandb_cache"), ("WANDB_DATA_DIR", "wandb_data")):
        monkeypatch.setenv(var, str(tmp_path / sub))


def _cfg(**wandb_cfg):
    wandb_cfg.setdefault("project", "midtrain-test")
    wandb_cfg.setdefault("mode", "offline")
    return MidtrainConfig(run=RunConfig(name="cbtest", wandb=WandbConfig(**wandb_cfg)), method=NTPMethodConfig())


def _trainer(cfg, run_dir, step=0, rank0=True):
    return SimpleNamespace(cfg=cfg, rank0=rank0, run_dir=str(run_dir), step=step, layout=SimpleNamespace(rank=0 if rank0 else 1))


def _records(first, last):
    return [{"step": s, "loss": 10.0 / s, "lr": 1e-3 * s, "grad_norm": 0.5, "tokens_per_s": 1000.0 + s,
             "step_time_s": 0.1, "remit/weight_mean": 1.0 + s / 100, "val/loss": float("nan") if s % 2 else 2.0 / s}
            for s in range(first, last + 1)]


def _drive(cfg, run_dir, records, step=0):
    cb = WandbLogger.from_config(cfg)
    trainer = _trainer(cfg, run_dir, step=step)
    cb.on_train_start(trainer)
    for record in records:
        cb.on_step_end(trainer, dict(record))
    cb.on_train_end(trainer)
    cb.close(trainer)  # after on_train_end: finish is a no-op; waits for W&B's service (flushes the log)
    return cb


def read_wandb_file(path):
    """The Records of a .wandb transaction log (LevelDB-log framing: 32 KiB blocks, 7-byte
    record headers <crc32 u32, length u16, type u8>; wandb 0.31 has no Python reader for it)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), "not a W&B transaction log"
    out, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def _offline_runs(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*")))


def _history(run_path):
    (log,) = glob.glob(os.path.join(run_path, "run-*.wandb"))
    records = read_wandb_file(log)
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return history, run


@needs_wandb
def test_offline_run_holds_the_loss_history(tmp_path):
    run_dir = tmp_path / "run"
    records = _records(1, 5)
    cb = _drive(_cfg(tags=["a", "b"]), run_dir, records)
    assert cb.run is None
    run_id = (run_dir / ID_FILE).read_text().strip()
    (run_path,) = _offline_runs(run_dir)
    assert run_path.endswith("-" + run_id)

    history, run = _history(run_path)
    assert run.run_id == run_id and run.project == "midtrain-test" and run.display_name == "cbtest"
    assert list(run.tags) == ["a", "b"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["run"]["wandb"]["project"] == "midtrain-test" and config["method"]["name"] == "ntp"

    assert [h["_step"] for h in history] == [r["step"] for r in records]
    assert [h["loss"] for h in history] == pytest.approx([r["loss"] for r in records])
    assert [h["remit/weight_mean"] for h in history] == pytest.approx([r["remit/weight_mean"] for r in records])
    # non-finite values are left out, not logged as NaN
    assert [h.get("val/loss") for h in history] == [None if r["step"] % 2 else pytest.approx(r["val/loss"]) for r in records]


@needs_wandb
def test_resume_reuses_the_run_id(tmp_path):
    run_dir = tmp_path / "run"
    _drive(_cfg(), run_dir, _records(1, 3))
    run_id = (run_dir / ID_FILE).read_text().strip()
    _drive(_cfg(), run_dir, _records(4, 6), step=3)
    assert (run_dir / ID_FILE).read_text().strip() == run_id
    runs = _offline_runs(run_dir)
    # offline-run-<time>-<id>, "-1" appended when both started in the same second
    assert len(runs) == 2 and all(re.search(f"-{run_id}(-\\d+)?$", r) for r in runs), runs
    history, run = _history(runs[-1])
    assert run.run_id == run_id
    assert [h["_step"] for h in history] == [4, 5, 6]


@needs_wandb
def test_only_rank0_and_custom_dir(tmp_path):
    cfg = _cfg(dir=str(tmp_path / "wb"))
    cb = WandbLogger.from_config(cfg)
    trainer = _trainer(cfg, tmp_path / "run", rank0=False)
    cb.on_train_start(trainer)
    cb.on_step_end(trainer, _records(1, 1)[0])
    cb.close(trainer)
    assert cb.run is None and not (tmp_path / "run").exists() and not (tmp_path / "wb").exists()
    _drive(cfg, tmp_path / "run", _records(1, 1))
    assert len(glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*"))) == 1


def test_from_config_off_and_bad_mode():
    assert WandbLogger.from_config(_cfg(project="")) is None
    assert WandbConfig().project == "" and WandbConfig().mode == "online"
    with pytest.raises(UserError, match="run.wandb.mode"):
        WandbConfig(mode="sometimes")


def test_missing_package_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(UserError, match=r"wandb is not installed.*pip install -e \"\.\[wandb\]\""):
        WandbLogger.from_config(_cfg())
    assert WandbLogger.from_config(_cfg(project="")) is None  # off: no import attempted


@needs_wandb
def test_training_run_writes_an_offline_wandb_run(tmp_path):
    """The real trainer (DP2 world) with ``run.wandb.project``: rank 0 writes one offline W&B run
    whose loss history is metrics.jsonl's."""
    from megatron_midtrain.testing.distributed import run_distributed
    from megatron_midtrain.testing.runs import run_jobs

    run_dir = tmp_path / "train"
    out = run_distributed(run_jobs, 2, [("train", ["train.max_steps=3", "run.wandb.project=midtrain-test",
                                                   "run.wandb.mode=offline", f"run.dir={run_dir}"])])
    records = out[0][0]["records"]
    (run_path,) = _offline_runs(str(run_dir))
    history, run = _history(run_path)
    assert run.project == "midtrain-test"
    assert [h["_step"] for h in history] == [r["step"] for r in records] == [1, 2, 3]
    assert [h["loss"] for h in history] == [r["loss"] for r in records]
    assert [h["grad_norm"] for h in history] == [r["grad_norm"] for r in records]
