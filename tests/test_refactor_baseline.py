"""Issue 13: the restructured training core reproduces the pre-refactor records bit for bit.

``tests/data/refactor_baseline.json`` was recorded on the old trainer (commit e407c9a) by
``tests/data/record_refactor_baseline.py``: 10 steps of ntp, remit (co-located and offline),
rho1, kd, grpo (with a k3 KL term) and rmt, at TP1 and TP2·PP2, every logged number but
wall-clock timings. This test reruns the recorder on the current code and asserts exact equality
(fp32, CPU, gloo): any change in the order of operations of a loss, a reduction or an RNG draw
shows up as a differing float. Statistics added since (new keys) are not compared.

Re-recorded once, on purpose (issue 12): the CPU gradient-clipping norm now accumulates in fp64
(utils/cpu_compat.py ``_l2_norm_fp64_accumulated``; megatron's local fallback took an fp32
``torch.norm`` per tensor, off by up to ~1e-4 relative). Against the e407c9a record that moved
437 of 1701 numbers, all in clipped steps, by at most 2.9e-5 relative (grpo's grad norm at TP1,
step 10); the code up to that change still reproduced the e407c9a record bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _recorder(monkeypatch):
    # An importable module (not a file loaded by path): the spawned ranks unpickle its functions.
    monkeypatch.syspath_prepend(os.path.join(HERE, "data"))
    return importlib.import_module("record_refactor_baseline")


def test_records_reproduced_bitwise(tmp_path, monkeypatch):
    with open(os.path.join(HERE, "data", "refactor_baseline.json")) as fh:
        expected = json.load(fh)["losses"]
    if os.environ.get("MIDTRAIN_TEST_CACHE"):
        monkeypatch.setenv("MIDTRAIN_CACHE", os.environ["MIDTRAIN_TEST_CACHE"])
    got = _recorder(monkeypatch).record(str(tmp_path))
    mismatches = []
    for layout, methods in expected.items():
        for method, records in methods.items():
            produced = got[layout][method]
            assert len(produced) == len(records), f"{layout}/{method}: {len(produced)} steps, expected {len(records)}"
            for want, have in zip(records, produced):
                for key, value in want.items():
                    if have.get(key) != value:
                        mismatches.append(f"{layout}/{method} step {want['step']} {key}: {have.get(key)!r} != {value!r}")
    assert not mismatches, f"{len(mismatches)} differences, first: " + "; ".join(mismatches[:8])
