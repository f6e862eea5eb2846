"""method=remit with a co-located frozen reference: neutrality and parallelism invariance (gloo)."""

import pytest

from megatron_midtrain.testing.distributed import run_distributed
from megatron_midtrain.testing.runs import run_jobs

TP2PP2 = ["parallel.tp=2", "parallel.pp=2"]


def test_reference_equal_to_initial_policy_is_exactly_ntp(tmp_path):
    ref = f"{tmp_path}/init/checkpoints/iter_0000000"
    common = TP2PP2 + ["train.max_steps=1", "train.eval_interval=0"]
    jobs = [
        ("save_initial", TP2PP2 + [f"run.dir={tmp_path}/init", "train.max_steps=1"]),
        ("train", common + [f"run.dir={tmp_path}/ntp"]),
        ("train", common + ["method=remit", f"reference.checkpoint={ref}", f"run.dir={tmp_path}/remit"]),
    ]
    saved, ntp, remit = run_distributed(run_jobs, 4, jobs)[0]
    assert saved == ref
    ntp, remit = ntp["records"][0], remit["records"][0]
    assert remit["loss"] == pytest.approx(ntp["loss"], rel=1e-6)
    assert remit["grad_norm"] == pytest.approx(ntp["grad_norm"], rel=1e-6)
    assert remit["remit/w_mean"] == 1.0 and remit["remit/w_std"] == 0.0
    assert remit["remit/frac_low"] == 0.0 and remit["remit/frac_high"] == 0.0
    assert remit["remit/delta_mean"] == 0.0


@pytest.mark.parametrize("layout", ["tp2pp2", "dp2"])
def test_remit_losses_match_across_layouts(layout, layout_runs):
    baseline, records = layout_runs("tp1")[("llama", "remit")]["records"], layout_runs(layout)[("llama", "remit")]["records"]
    assert [r["step"] for r in records] == [r["step"] for r in baseline] == list(range(1, 4))
    for ref, got in zip(baseline, records):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), ref["step"]
        assert got["remit/w_mean"] == pytest.approx(ref["remit/w_mean"], rel=1e-5)
    # The reference must really reweight tokens, or this would only re-test NTP.
    assert 0.0 < baseline[0]["remit/w_std"] and baseline[0]["remit/frac_high"] > 0.0
