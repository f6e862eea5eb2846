"""Offline reference scores (tools/score_reference.py + reference.mode=offline), gloo on the CPU."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_midtrain.errors import UserError
from megatron_midtrain.reference.offline import score_reference
from megatron_midtrain.testing.distributed import free_port, run_distributed
from megatron_midtrain.testing.runs import train_and_report, with_test_defaults

ROOT = Path(__file__).resolve().parents[1]
TOOL = str(ROOT / "tools" / "score_reference.py")
TP2PP2 = ["parallel.tp=2", "parallel.pp=2"]
STEPS = 10


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _run(cmd, **kw):
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, check=False, **kw)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_store_rows_done_bits_and_growth(tmp_path):
    """Unit level: float16 rows round-trip, missing samples name their step, a store grows in place."""
    from megatron_midtrain.reference import store as st

    meta = {"seed": 1, "seq_length": 4, "global_batch_size": 8, "tokenizer": "t", "dtype": "float16", "num_samples": 16}
    s = st.create_or_open(str(tmp_path), meta)
    s.close()
    w = st.open_store(str(tmp_path), writable=True)
    rows = -np.arange(32, dtype=np.float32).reshape(8, 4) / 7
    tokens = np.arange(64).reshape(8, 2, 4)  # any integers: only their digest is kept
    w.write_rows(np.arange(8), rows, [st.sample_digest(t[0], t[1]) for t in tokens])
    w.close()
    r = st.open_store(str(tmp_path))
    got = r.read_rows([2, 3], tokens[2:4, 0], tokens[2:4, 1])
    assert got.dtype == np.float32 and np.allclose(got, rows[2:4], rtol=1e-3)
    assert r.step_done(1) and not r.step_done(2) and r.scored_steps() == 1
    with pytest.raises(UserError, match=r"no scores for sample 9 \(training step 2\)"):
        r.read_rows([7, 9, 10])
    with pytest.raises(UserError, match="sample 3 .* other tokens"):
        r.read_rows([3], tokens[4:5, 0], tokens[4:5, 1])
    grown = st.create_or_open(str(tmp_path), dict(meta, num_samples=24))
    assert grown.num_samples == 24 and np.array_equal(grown.read_rows([5]), r.read_rows([5]))
    with pytest.raises(UserError, match="data.seq_length is 4 in the store vs 8 here"):
        st.create_or_open(str(tmp_path), dict(meta, seq_length=8))


def _reference_and_stores(ref_dir: str, resumed: str, fresh: str) -> None:
    """One process (start-up dominates on 2 cores): a reference that differs from the policy
    (a few NTP steps from another seed, saved at TP1), a 2-step store and a fresh 4-step store."""
    train_and_report([f"run.dir={ref_dir}", "train.max_steps=4", "optimizer.lr=1e-2", "run.seed=7"])
    base = with_test_defaults([f"reference.checkpoint={ref_dir}"])
    score_reference(base + ["train.max_steps=2", f"reference.scores={resumed}"])
    score_reference(base + ["train.max_steps=4", f"reference.scores={fresh}"])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(reference run dir, resumed store, fresh store): both stores hold steps 1..4; the resumed one
    was scored in two runs, the first cut short, the second under torchrun with two DP writers."""
    root = tmp_path_factory.mktemp("offline")
    ref, resumed, fresh = root / "reference", root / "resumed", root / "fresh"
    run_distributed(_reference_and_stores, 1, str(ref), str(resumed), str(fresh))
    # As if killed while writing step 2: rows on disk, but its last sample not marked done yet.
    with open(resumed / "done.bin", "r+b") as fh:
        fh.seek(15)
        fh.write(b"\x00")
    base = with_test_defaults([f"reference.checkpoint={ref}"])
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                 TOOL, *base, "train.max_steps=4", f"reference.scores={resumed}", "--log-interval", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scoring 3 of 4 steps (1 already in the store)" in proc.stdout
    assert "samples/s" in proc.stdout and "ETA" in proc.stdout and "done: scored 24 samples" in proc.stdout
    return str(ref), resumed, fresh


def test_resumed_scoring_matches_a_single_run_bitwise(prepared):
    _, resumed, fresh = prepared
    for name in ("logprobs.bin", "done.bin", "sample_hash.bin"):
        assert (resumed / name).read_bytes() == (fresh / name).read_bytes(), name
    assert json.loads((resumed / "meta.json").read_text()) == json.loads((fresh / "meta.json").read_text())
    rows = np.fromfile(fresh / "logprobs.bin", dtype=np.float32).reshape(32, 128)
    assert (rows < 0).all() and np.isfinite(rows).all()
    assert (np.fromfile(fresh / "done.bin", dtype=np.uint8) == 1).all()


def test_store_shorter_than_training_fails_at_first_unscored_step(prepared, tmp_path):
    _, _, fresh = prepared
    cmd = [sys.executable, "-m", "megatron_midtrain.train",
           *with_test_defaults(["method=remit", "reference.mode=offline", f"reference.scores={fresh}",
                                "train.max_steps=5", "train.log_interval=1", f"run.dir={tmp_path}"])]
    proc = _run(cmd)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "sample 32 (training step 5)" in errors[0] and "score_reference.py" in errors[0]
    assert "step 4/5" in proc.stdout and "step 5/5" not in proc.stdout


@pytest.mark.parametrize("override,field", [
    ("data.seq_length=64", "data.seq_length is 128 in the store vs 64 here"),
    ("run.seed=99", "run.seed is 1234 in the store vs 99 here"),
    ("train.global_batch_tokens=2048", "global batch in sequences"),
    ("data.demo_math_weight=0.25", "data.weights"),
])
def test_misaligned_config_is_refused_at_start(prepared, override, field):
    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.reference.offline import OfflineReference

    _, _, fresh = prepared
    meta = json.loads((fresh / "meta.json").read_text())
    cfg = load_config(with_test_defaults(["reference.mode=offline", f"reference.scores={fresh}", override]))
    G = cfg.train.global_batch_tokens // cfg.data.seq_length
    with pytest.raises(UserError, match="re-score") as err:
        OfflineReference(cfg, meta["tokenizer"], G)
    assert field in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="tokenizer"):
        OfflineReference(load_config(with_test_defaults([f"reference.scores={fresh}"])), "other:1:abc", 8)


def _score_then_train(reference: str, store: str, run_root: str) -> dict:
    """Score at TP2/PP2, then train ReMiT from the store and with the co-located reference
    (one launch of 4 processes: their start-up costs more than the work)."""
    from megatron.core import parallel_state

    from megatron_midtrain.training import distributed, trainer

    # Keep the gloo group between the phases (re-creating a 4-rank group on the same port can
    # race with the old one's rendezvous); only megatron's groups are rebuilt per phase.
    distributed.shutdown = trainer.shutdown = parallel_state.destroy_model_parallel
    common = TP2PP2 + ["method=remit", f"train.max_steps={STEPS}"]
    score_reference(with_test_defaults(common + [f"reference.checkpoint={reference}", f"reference.scores={store}"]), "float32")
    out = {}
    for name, extra in (("offline", ["reference.mode=offline", f"reference.scores={store}"]),
                        ("colocated", [f"reference.checkpoint={reference}"])):
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            out[name] = train_and_report(common + extra + [f"run.dir={run_root}/{name}"]).get("records")
        out[name + "_log"] = log.getvalue()
    return out


def test_offline_training_equals_colocated(prepared, tmp_path):
    reference = prepared[0]
    store = tmp_path / "store"
    out = run_distributed(_score_then_train, 4, reference, str(store), str(tmp_path))[0]
    assert f"reference: offline scores from {store}" in out["offline_log"]
    assert "frozen" not in out["offline_log"]  # the reference model was never built
    assert "frozen" in out["colocated_log"]
    offline, colocated = out["offline"], out["colocated"]
    assert [r["step"] for r in offline] == list(range(1, STEPS + 1))
    for want, got in zip(colocated, offline):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), want["step"]
        assert got["remit/w_mean"] == pytest.approx(want["remit/w_mean"], rel=1e-5), want["step"]
    # The reference must really reweight tokens, or this would only compare NTP runs.
    assert colocated[0]["remit/w_std"] > 0.0
