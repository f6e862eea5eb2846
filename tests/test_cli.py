"""End-to-end CLI: outputs of a run, and torchrun ranks agreeing on one run directory."""

import json
import os
import subprocess
import sys

import yaml

from megatron_midtrain.testing.distributed import free_port
from megatron_midtrain.testing.runs import with_test_defaults

REQUIRED_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "consumed_tokens"}


def test_torchrun_writes_one_run_dir_with_all_outputs(tmp_path):
    # No run.dir: rank 0 picks runs/<name>-<timestamp> and broadcasts it, so two ranks
    # that start at different moments still write into a single directory.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "megatron_midtrain.train", *[o for o in with_test_defaults([]) if not o.startswith("run.plot")],
           "run.name=e2e", "train.max_steps=3", "train.eval_interval=3", "train.log_interval=1", "parallel.tp=2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = os.listdir(tmp_path / "runs")
    assert len(runs) == 1 and runs[0].startswith("e2e-"), runs
    run = tmp_path / "runs" / runs[0]

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["run"]["dir"] == str(run) and config["parallel"]["tp"] == 2 and config["method"]["name"] == "ntp"

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert REQUIRED_KEYS <= record.keys()
    assert records[-1]["consumed_tokens"] == 3 * 1024
    assert "val/loss" in records[-1]
    assert (run / "metrics.png").stat().st_size > 1000
    assert (run / "checkpoints" / "latest").read_text().strip() == "3"
    assert (run / "checkpoints" / "iter_0000003" / "meta.json").exists()

    # progress lines: step, loss, tokens/s and ETA, printed once (rank 0 only)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 3 and all("tok/s" in line and "ETA" in line for line in lines)


def test_rerun_of_finished_run_is_a_no_op(tmp_path):
    cmd = [sys.executable, "-m", "megatron_midtrain.train", *with_test_defaults(["train.max_steps=2", f"run.dir={tmp_path}"])]
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=600).returncode == 0
    before = (tmp_path / "metrics.jsonl").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert "already finished step 2" in again.stdout
    assert (tmp_path / "metrics.jsonl").read_text() == before
