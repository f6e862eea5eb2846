"""Every benchmark in benchmarks/ runs with its smallest settings and prints its table (smoke tests).

Only that each one exits 0 and prints its summary is checked, not its figures: the figures
are measurements of whatever machine runs the suite. Each runs as a subprocess, exactly as a
user starts it, in a scratch working directory; the demo assets come from the session's cache
(``MIDTRAIN_CACHE``, set by tests/conftest.py).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def run_benchmark(name: str, *args: str, cwd: Path, timeout: int = 600) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{name} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def last_json(stdout: str) -> dict:
    """The benchmark's closing JSON line."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON summary line in:\n{stdout[-3000:]}"
    return json.loads(lines[-1])


def test_every_benchmark_has_a_smoke_test():
    covered = {"throughput.py", "remit_overhead.py", "rollout.py", "preprocess_throughput.py", "convert_memory.py",
               "gpu_acceptance.py", "flywheel.py"}
    assert {p.name for p in BENCH.glob("*.py")} == covered, "a new benchmark needs a smoke test here"


def test_throughput_defaults_to_ntp(tmp_path):
    # The config's default method (remit) needs a reference; plain throughput is NTP's.
    out = run_benchmark("throughput.py", "--steps", "1", "--warmup", "0", cwd=tmp_path)
    assert "tokens/s" in out
    result = last_json(out)
    assert result["method"] == "ntp" and result["timed_steps"] == 1 and result["tokens_per_s"] > 0


def test_remit_overhead(tmp_path):
    out = run_benchmark("remit_overhead.py", "--steps", "1", "--warmup", "0", cwd=tmp_path)
    assert "mode" in out and "vs NTP" in out
    for mode in ("ntp", "remit_colocated", "remit_offline"):
        assert f"\n{mode}" in out
    assert set(last_json(out)["results"]) == {"ntp", "remit_colocated", "remit_offline"}


def test_rollout(tmp_path):
    args = ["--smoke"] + (["--hf"] if HAVE_TRANSFORMERS else [])
    out = run_benchmark("rollout.py", *args, cwd=tmp_path)
    assert "generation:" in out and "RMT loop" in out
    result = last_json(out)
    assert {"kv_cache", "recompute"} <= set(result["generation"])
    if HAVE_TRANSFORMERS:
        assert "hf_generate" in result["generation"]


def test_preprocess_throughput(tmp_path):
    out = run_benchmark("preprocess_throughput.py", "--workers", "1", "--repeat", "1", cwd=tmp_path)
    assert "workers" in out and "docs/s" in out
    assert set(last_json(out)) == {"1"}


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None, reason="needs safetensors (pip install -e '.[hf]')")
def test_convert_memory(tmp_path):
    out = run_benchmark("convert_memory.py", "--smoke", cwd=tmp_path)
    assert "import: peak RSS" in out and "export: peak RSS" in out
    assert last_json(out)["shape"] == "smoke"


def test_gpu_acceptance_cpu_smoke(tmp_path):
    out = run_benchmark("gpu_acceptance.py", "--cpu-smoke", "--out", str(tmp_path / "acceptance.json"), cwd=tmp_path)
    assert "| # | section | check | device | status | result |" in out
    report = json.loads((tmp_path / "acceptance.json").read_text())
    assert report["environment"]["mode"] == "cpu-smoke" and report["all_passed"]
    checks = {(r["section"], r["check"]): r for r in report["checks"]}
    methods = {c for s, c in checks if s == "methods"}
    assert methods == {"ntp", "remit (co-located)", "remit (offline)", "rho1", "kd", "grpo", "rmt"}
    assert {s for s, _ in checks} == {"methods", "checkpoint", "performance", "rollout"}
    for row in report["checks"]:
        assert row["status"] in ("PASS", "SKIPPED", "MEASURED"), row
        assert row["status"] != "SKIPPED" or row["result"].startswith("skipped: "), row
        assert row["device"] == ("-" if row["status"] == "SKIPPED" else "cpu, fp32"), row
        assert f"| {row['status']} |" in out


def test_flywheel_quick_runs_and_resumes(tmp_path):
    """The whole flywheel pipeline at tiny sizes, then the same command again: every stage and
    evaluation is reused from the cache (nothing is trained twice) and the outputs are rewritten."""
    out_dir = tmp_path / "out"
    first = run_benchmark("flywheel.py", "--quick", "--out", str(out_dir), cwd=tmp_path, timeout=1200)
    methods = ("ntp", "remit", "remit_sft", "rho1", "kd", "rmt")
    header = next(line for line in first.splitlines() if line.startswith("| metric |"))
    assert all(f"| {m} (n=2)" in header or f" {m} (n=2) |" in header for m in methods), header
    results = json.loads((out_dir / "results.json").read_text())
    assert sorted((r["method"], r["seed"]) for r in results["runs"]) == sorted((m, s) for m in methods for s in (1, 2))
    assert all("accuracy_post" in r for r in results["runs"])
    assert [r["method"] for r in results["runs"] if "mechanism" in r] == ["remit", "remit_sft"]
    assert (out_dir / "flywheel.png").stat().st_size > 10_000
    assert last_json(first)["ntp"]["val_loss_math"]["n"] == 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    again = subprocess.run([sys.executable, str(BENCH / "flywheel.py"), "--quick", "--out", str(out_dir)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[flywheel] stage " not in again.stderr, "a finished stage was trained again"
    assert json.loads((out_dir / "results.json").read_text())["summary"] == results["summary"]
