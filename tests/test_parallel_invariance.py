"""Same config + seed => same per-step losses under any TP/PP/DP layout (gloo, CPU).

The runs come from conftest's ``layout_runs`` (one spawned world per layout, shared with the
OLMo-2 and method invariance tests).
"""

import pytest

STEPS = 6


@pytest.mark.parametrize("name", ["tp2", "pp2", "dp2", "tp2pp2"])
def test_losses_match_single_process(name, layout_runs):
    baseline, records = layout_runs("tp1")["ntp"], layout_runs(name)["ntp"]
    assert [r["step"] for r in records] == [r["step"] for r in baseline] == list(range(1, STEPS + 1))
    worst = max(abs(got["loss"] - ref["loss"]) / abs(ref["loss"]) for ref, got in zip(baseline, records))
    print(f"{name}: max relative loss difference vs TP1/PP1 over {STEPS} steps = {worst:.2e}")
    for ref, got in zip(baseline, records):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), (name, ref["step"])
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), (name, ref["step"])
    # The model must actually be learning, or equal losses would prove little.
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
