"""The ~30-line example method of docs/architecture.md (examples/ref_filter_method.py) trains.

It is written the way the docs say a method is added (one file: config dataclass, registered
method, declared input), and runs under TP2 through the real trainer with a co-located reference.
"""

from __future__ import annotations

import os
import sys

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _train_pair(root: str, reference: str) -> list:
    """ref_filter with min_prob 0 (keeps every token) and 0.001 (twice the uniform 1/2048), then plain NTP; rank 0's records."""
    sys.path.insert(0, EXAMPLES)
    import ref_filter_method  # noqa: F401  (registers method=ref_filter)

    from megatron_midtrain.testing.runs import run_jobs

    common = ["parallel.tp=2", "train.max_steps=2", f"reference.checkpoint={reference}"]
    return run_jobs([
        ("train", common + ["method=ref_filter", "method.min_prob=0.0", f"run.dir={root}/all"]),
        ("train", common + ["method=ref_filter", "method.min_prob=0.001", f"run.dir={root}/filtered"]),
        ("train", common[:2] + ["method=ntp", f"run.dir={root}/ntp"]),
    ])


def _reference(root: str) -> str:
    from megatron_midtrain.testing.runs import run_jobs

    run_jobs([("train", ["train.max_steps=4", "optimizer.lr=1e-2", f"run.dir={root}"])])
    return root


def test_example_method_trains_and_filters(tmp_path):
    from megatron_midtrain.testing.distributed import run_distributed

    reference = run_distributed(_reference, 1, str(tmp_path / "reference"))[0]
    keep_all, filtered, ntp = run_distributed(_train_pair, 2, str(tmp_path), reference)[0]
    rows = list(zip(keep_all["records"], filtered["records"], ntp["records"]))
    assert len(rows) == 2
    for a, f, n in rows:
        # min_prob 0 keeps every token: the objective is plain NTP, so the run is NTP's run.
        assert a["ref_filter/kept_frac"] == 1.0
        assert abs(a["loss"] - n["loss"]) <= 1e-6 * abs(n["loss"]), (a["loss"], n["loss"])
        # a threshold drops the tokens the reference finds implausible, and changes the loss
        assert 0.0 < f["ref_filter/kept_frac"] < 1.0, f
        assert f["loss"] != a["loss"]
        # the NTP loss the method also reports is over every token
        assert abs(a["ntp_loss"] - n["loss"]) <= 1e-6 * abs(n["loss"])
