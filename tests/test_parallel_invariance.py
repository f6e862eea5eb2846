"""Same config + seed => same per-step losses under any TP/PP/DP layout (gloo, CPU)."""

import pytest

from megatron_midtrain.testing.distributed import run_distributed
from megatron_midtrain.testing.runs import train_and_report

STEPS = 6
LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "dp2": (2, []),
    "tp2pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tp1pp1")
    out = run_distributed(train_and_report, 1, [f"train.max_steps={STEPS}", f"run.dir={run_dir}"])
    return out[0]["records"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_losses_match_single_process(name, baseline, tmp_path):
    world, overrides = LAYOUTS[name]
    out = run_distributed(train_and_report, world, overrides + [f"train.max_steps={STEPS}", f"run.dir={tmp_path}"])
    records = out[0]["records"]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    worst = max(abs(got["loss"] - ref["loss"]) / abs(ref["loss"]) for ref, got in zip(baseline, records))
    print(f"{name}: max relative loss difference vs TP1/PP1 over {STEPS} steps = {worst:.2e}")
    for ref, got in zip(baseline, records):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), (name, ref["step"])
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), (name, ref["step"])
    # The model must actually be learning, or equal losses would prove little.
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
