"""Bad input: one actionable `error:` line, exit code 2, nothing corrupted or half-written."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from megatron_midtrain.config.schema import MidtrainConfig, ModelConfig, ParallelConfig
from megatron_midtrain.errors import UserError
from megatron_midtrain.testing.runs import with_test_defaults
from megatron_midtrain.training.distributed import check_layout


def midtrain(*overrides, env=None):
    cmd = [sys.executable, "-m", "megatron_midtrain.train", *with_test_defaults(list(overrides))]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def assert_one_line_error(proc, *fragments):
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "fix:" in errors[0], errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    return errors[0]


def demo_assets():
    from megatron_midtrain.data.demo import ensure_demo_assets

    return ensure_demo_assets(os.environ["MIDTRAIN_CACHE"])


def test_unknown_config_key(tmp_path):
    proc = midtrain("train.max_stepz=5", f"run.dir={tmp_path}/run")
    assert_one_line_error(proc, "train.max_stepz")
    assert not (tmp_path / "run").exists()


def test_unknown_method(tmp_path):
    proc = midtrain("method=nope", f"run.dir={tmp_path}/run")
    assert_one_line_error(proc, "nope", "ntp")


def test_unknown_experiment_preset(tmp_path):
    # Was silently ignored (an `optional` defaults entry), training the default method instead.
    proc = midtrain("experiment=rmt_dmeo", f"run.dir={tmp_path}/run")
    assert_one_line_error(proc, "rmt_dmeo", "rmt_demo")
    assert not (tmp_path / "run").exists()


def test_wrong_type(tmp_path):
    proc = midtrain("train.max_steps=many", f"run.dir={tmp_path}/run")
    assert_one_line_error(proc, "train.max_steps", "'many'")


def test_context_parallel_is_refused_until_implemented(tmp_path):
    """parallel.cp > 1 used to be accepted on GPUs while nothing split the sequence per CP rank."""
    proc = midtrain("parallel.cp=2", f"run.dir={tmp_path}/run")
    assert_one_line_error(proc, "parallel.cp=2", "not implemented", "parallel.cp=1")
    assert not (tmp_path / "run").exists()


def test_tp_larger_than_world(tmp_path):
    proc = midtrain("parallel.tp=2", f"run.dir={tmp_path}/run")
    assert_one_line_error(proc, "parallel.tp", "world size 1")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "model,parallel,world,fragment",
    [
        (dict(num_layers=4), dict(pp=3), 3, "num_layers=4"),
        (dict(num_attention_heads=4, num_query_groups=1), dict(tp=2), 2, "KV groups"),
        (dict(num_attention_heads=6, num_query_groups=6, hidden_size=96), dict(tp=4), 4, "attention heads"),
        (dict(), dict(tp=2, pp=2), 6, "world size 6"),
    ],
)
def test_indivisible_layouts(model, parallel, world, fragment):
    cfg = MidtrainConfig(model=ModelConfig(**model), parallel=ParallelConfig(**parallel), method=None)
    with pytest.raises(UserError, match=fragment) as err:
        check_layout(cfg, world)
    assert "\n" not in str(err.value) and "fix:" in str(err.value)


def test_missing_dataset(tmp_path):
    assets = demo_assets()
    proc = midtrain(f"data.paths=[{tmp_path}/nothere]", f"data.tokenizer={assets.tokenizer_path}", f"run.dir={tmp_path}/run")
    assert_one_line_error(proc, "nothere")
    assert not (tmp_path / "run").exists()


def test_truncated_bin(tmp_path):
    assets = demo_assets()
    prefix = tmp_path / "cut"
    shutil.copy(f"{assets.prose_prefix}.idx", f"{prefix}.idx")
    with open(f"{assets.prose_prefix}.bin", "rb") as src, open(f"{prefix}.bin", "wb") as dst:
        data = src.read()
        dst.write(data[: len(data) // 2])
    proc = midtrain(f"data.paths=[{prefix}]", f"data.tokenizer={assets.tokenizer_path}", f"run.dir={tmp_path}/run")
    assert_one_line_error(proc, "cut.bin")


def test_tokenizer_larger_than_model_vocab(tmp_path):
    proc = midtrain("model.vocab_size=1024", f"run.dir={tmp_path}/run")
    assert_one_line_error(proc, "2048", "model.vocab_size=1024")
    assert not (tmp_path / "run").exists()


def test_checkpoint_from_other_architecture_is_refused(tmp_path):
    run = tmp_path / "run"
    ok = midtrain("train.max_steps=2", f"run.dir={run}")
    assert ok.returncode == 0, ok.stderr[-3000:]
    before = {name: (run / name).read_text() for name in ("metrics.jsonl", "config.yaml")}
    proc = midtrain("train.max_steps=4", "model.hidden_size=64", f"run.dir={run}")
    assert_one_line_error(proc, "hidden_size=128", "64")
    for name, text in before.items():  # the run's history and config are untouched
        assert (run / name).read_text() == text, name
    assert sorted(os.listdir(run / "checkpoints")) == ["iter_0000002", "latest"]


def _train_with_nonfinite_steps(overrides, steps):
    """Train with :class:`InjectNonFinite` at ``steps``; the UserError's text and rank 0's records."""
    from megatron_midtrain.testing.callbacks import InjectNonFinite
    from megatron_midtrain.testing.runs import train_and_report

    return train_and_report(overrides, callbacks=[InjectNonFinite(steps)], catch_user_error=True)


def test_nonfinite_loss_skips_steps_then_stops(tmp_path):
    from megatron_midtrain.testing.distributed import run_distributed

    run = tmp_path / "run"
    out = run_distributed(_train_with_nonfinite_steps, 2, ["train.max_steps=8", "train.max_consecutive_nonfinite=3",
                                                           "train.save_interval=1", f"run.dir={run}"], [2, 4, 5, 6])
    assert all("3 consecutive steps had a non-finite loss (last at step 6)" in o["error"] for o in out), out
    records = out[0]["records"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [bool(r.get("skipped")) for r in records] == [False, True, False, True, True, True]
    # A skipped step leaves the weights alone and no checkpoint holds a diverged state.
    assert all(r["loss"] == r["loss"] for r in records if not r.get("skipped"))
    assert not any(r["loss"] == r["loss"] for r in records if r.get("skipped"))
    assert sorted(os.listdir(run / "checkpoints"))[-2:] == ["iter_0000005", "latest"]


def test_reset_position_ids_is_refused(tmp_path):
    proc = midtrain("data.reset_position_ids=true", f"run.dir={tmp_path}/run")
    assert_one_line_error(proc, "reset_position_ids", "reset_attention_mask")


def test_nonpositive_demo_sft_steps_is_refused():
    from megatron_midtrain.config.schema import DataConfig

    with pytest.raises(UserError, match="data.demo_sft_steps=0") as err:
        DataConfig(demo_sft_steps=0)
    assert "fix:" in str(err.value)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for CPU-only machines")
def test_fp8_reference_is_refused_without_a_gpu():
    from megatron_midtrain.config.schema import ReferenceConfig

    cfg = MidtrainConfig(reference=ReferenceConfig(fp8=True), method=None)
    with pytest.raises(UserError, match="reference.fp8") as err:
        check_layout(cfg, 1)
    assert "\n" not in str(err.value) and "fix:" in str(err.value)


def test_reference_of_another_architecture_or_tokenizer_is_refused(tmp_path):
    ref = tmp_path / "ref"
    ok = midtrain("train.max_steps=1", "model.hidden_size=64", f"run.dir={ref}")
    assert ok.returncode == 0, ok.stderr[-3000:]
    proc = midtrain("method=remit", f"reference.checkpoint={ref}", f"run.dir={tmp_path}/run")
    assert_one_line_error(proc, "reference", "hidden_size=64", "128")
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing written for the refused run

    # Same architecture, other tokenizer (the fingerprint recorded in the reference's meta.json).
    same = tmp_path / "same"
    assert midtrain("train.max_steps=1", f"run.dir={same}").returncode == 0
    meta_path = same / "checkpoints" / "iter_0000001" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["tokenizer"] = "sentencepiece:0123456789abcdef"
    meta_path.write_text(json.dumps(meta))
    proc = midtrain("method=remit", f"reference.checkpoint={same}", f"run.dir={tmp_path}/run2")
    assert_one_line_error(proc, "tokenizer", "0123456789abcdef")
    assert not (tmp_path / "run2" / "config.yaml").exists()
