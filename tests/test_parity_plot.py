"""tools/plot_parity_trajectories.py (the parity trajectory figure and its table, on made-up runs) and
tests/data/parity_rounding_probe.py (the rounding floor behind the GRPO/RMT step-3 bound)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "plot_parity_trajectories.py"


def _write_run(root: Path, family: str, losses: list[float]) -> None:
    run = root / family / "ntp"
    run.mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as fh:
        for step, loss in enumerate(losses, start=1):
            fh.write(json.dumps({"step": step, "loss": loss, "grad_norm": 1.0}) + "\n")


def test_table_holds_the_worst_relative_difference_and_the_figure_is_written(tmp_path):
    base = [4.0, 3.0, 2.0, 1.0]
    _write_run(tmp_path / "tp1", "llama", base)
    _write_run(tmp_path / "tp2", "llama", [4.0, 3.0, 2.0 * (1 + 3e-7), 1.0])
    _write_run(tmp_path / "pp2", "llama", base)  # exact: drawn at the panel's floor
    _write_run(tmp_path / "tp1", "olmo2", base)
    _write_run(tmp_path / "tp2", "olmo2", [4.0, 3.0 * (1 + 2e-3), 2.0, 1.0])
    _write_run(tmp_path / "pp2", "olmo2", base)
    _write_run(tmp_path / "tp1", "qwen3", base)  # only at TP1: left out
    out = tmp_path / "fig" / "parity.png"
    proc = subprocess.run([sys.executable, str(TOOL), "--tp1", str(tmp_path / "tp1"), "--layout", f"TP2={tmp_path / 'tp2'}",
                           "--layout", f"PP2={tmp_path / 'pp2'}", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]]
            for line in proc.stdout.splitlines() if line.startswith("| ") and "family" not in line}
    assert rows == {"llama": ["3.00e-07", "0.00e+00"], "olmo2": ["2.00e-03", "0.00e+00"]}
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"


def test_bad_input_is_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), "--tp1", str(tmp_path / "missing"), "--layout", "TP2"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: --layout 'TP2' is not NAME=ROOT")
    proc = subprocess.run([sys.executable, str(TOOL), "--tp1", str(tmp_path / "missing"), "--layout", f"TP2={tmp_path}"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "is not a directory" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_rounding_probe_runs_and_reports_its_variants(tmp_path):
    """tests/data/parity_rounding_probe.py (the figures behind test_grad_parity's rounding floor) runs."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "data" / "parity_rounding_probe.py"), "--workdir", str(tmp_path),
                           "--", "method=ntp", "train.max_steps=3"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| nudged"))
    step1, step3 = (float(c) for c in row.split("|")[2:4])
    assert 0 < step1 <= 1e-5 and step3 <= 1e-4  # one ulp away stays one rounding away


def test_tiny_gradient_share_counts_only_the_tiny_gradient_elements():
    import torch

    from megatron_midtrain.testing.grads import FullGradients

    sys.path.insert(0, str(ROOT / "tests" / "data"))
    from parity_rounding_probe import tiny_gradient_share

    def run(params, grads):
        return {"params": FullGradients(tensors={("w", None): torch.tensor(params)}),
                "grads": {1: FullGradients(tensors={("w", None): torch.tensor(grads)})}}

    base = run([0.0, 0.0, 0.0], [1e-9, 1e-3, 1e-3])
    other = run([3.0, 1.0, 0.0], [1e-9, 1e-3, 1e-3])
    assert tiny_gradient_share(base, other) == 0.9  # 9 of 10 on the one tiny-gradient element
