"""The same model at any layout, parameter by parameter (gloo, CPU, fp32; some cells also fp64).

For every model family x method x layout of conftest's parity matrix, every parameter's full
gradient after step 1 and after step 3 (when the optimizer state has acted twice) must match
the TP1/PP1/DP1 run: ``||g - g_ref|| / ||g_ref|| <= 1e-5`` per parameter and layer. Replicas of
one tensor (DP copies, TP-replicated norms, the tied head) must agree with each other. For each
family, the 30-step NTP loss trajectory at TP2 and at PP2 must stay within 1e-6 of TP1's (the
issue asks for 1e-4).

GRPO and RMT after step 3 are the one exception, and it is not a layout's: their fp32 step-3
gradients sit ~1e-5 from TP1's at *every* layout, TP1 itself included. They are held to
``GRAD_RTOL + ROUNDING_FACTOR x`` the cell's rounding floor, measured in the same session: the
same cell at TP1 from weights one ulp away (conftest.ROUNDING_CONTROL_METHODS). Why (llama GRPO,
this 2-core AVX-512 EPYC; ``tests/data/parity_rounding_probe.py`` prints the controls below, and
``pytest -s`` on this file every cell's figures):

* step 1 matches at every layout (<= 2.1e-6 over every family, asserted at GRAD_RTOL), so the
  gradient computation is exact; only what Adam makes of it differs;
* Adam's first update is ``lr * g / (|g| + eps)``, whose slope in ``g`` is up to lr/eps = 1e5:
  99.9% of the step-1 parameter difference between TP2 and TP1 sits on the 0.14% of elements
  with ``|g| < 1e-7``, whose values are mostly cancellation (the group advantages sum to zero)
  and differ by ~10% between any two fp32 evaluation orders. Steps 2-3 carry that on through
  layer norms whose RL gradients cancel too;
* TP1 against TP1 one ulp away (the control): 1.6e-5 at step 3, and TP1 against TP1 with AVX2
  instead of AVX-512 kernels (``ATEN_CPU_CAPABILITY=avx2``, same code, same layout): 1.7e-5,
  both *more* than TP2's 1.0e-5. No layout can meet 1e-5 there in fp32; the control is the floor;
* the excess scales with the unit roundoff: in fp64 (test_fp64_every_parameter_gradient_matches_tp1,
  same cells) the step-3 differences are <= 1.6e-13, and fp32 / fp64 ≈ 2^29 = u32 / u64
  (1.4e8-1.1e9 over the fp64 cells), which a layout bug would not do.

Regressions these caught (each failed before its fix):
* OLMo-2's full-width QK-norm weight, sharded over TP, had its gradient SUM-reduced over TP by
  megatron's name-based ``q_layernorm``/``k_layernorm`` rule, which added the two ranks'
  *different* slices together (relative difference 1.0 at TP2, invisible in the loss at step 1);
* the post-norm weights (and every RMSNorm of the local spec) were not tagged
  ``sequence_parallel``, so under sequence parallelism each TP rank kept only its part of the
  sequence's gradient (0.5-0.66 relative at TP2+SP; replicas disagreed);
* megatron's CPU gradient-norm fallback took fp32 ``torch.norm`` per tensor, a clip coefficient
  that differed by 1.5e-5 between TP1 and TP2 (now accumulated in fp64, utils/cpu_compat.py);
* (fp64 cells, slow) OLMo-2's full-width QK-norm computed in fp32 even for fp64 inputs, so its
  fp64 GRPO/RMT gradients differed from TP1's by 2.6e-7 at step 1 and 1.0e-5 at step 3 (TP2),
  against <= 1.6e-13 once it keeps fp64 (tests/test_olmo2_invariance.py has the unit check).
"""

import math

import pytest
import torch

from conftest import (CORE_CELLS, DEFECT_CELL, EXTENDED_CELLS, FAMILIES, FP64_CELLS, FP64_EXTENDED_CELLS, FP64_LAYOUTS,
                      NOT_INVARIANT, ROUNDING_CONTROL_METHODS, TRAJECTORY_STEPS)

from megatron_midtrain.testing.grads import FullGradients, compare

GRAD_RTOL = 1e-5
#: The issue asks for 1e-4; measured after the fixes: <= 8.5e-8 for every family at TP2 and PP2
#: (6.9e-8 on an AVX-512 EPYC).
#: 1e-6 also catches the OLMo-2 QK-norm bug on its own (before the fix: 5.7e-6 at TP2 over these
#: 30 steps at lr 1e-3; 2.4e-3 at the default lr).
TRAJECTORY_RTOL = 1e-6
GRAD_NORM_RTOL = 1e-3
LAYOUTS = ("tp2", "pp2", "dp2", "tp2pp2", "tp2sp")
CAPTURED = (1, 3)
#: GRPO/RMT step 3: per parameter within GRAD_RTOL + ROUNDING_FACTOR x the cell's rounding floor
#: (the worst per-parameter difference of its one-ulp TP1 control at that step). Measured over
#: the whole matrix: a layout's worst step-3 difference is at most 4.6x its cell's floor (qwen3/rmt
#: at PP2: 8.5e-5 against 1.9e-5; fp64 shows the same PP2 cell 6x its TP2 one), most cells below
#: 1x; the bounds are 9.5e-5-6.7e-4. A wrongly reduced shard is 0.5-1.0, three orders above them,
#: and a 1% optimizer-state defect 1.6e-3 (test_step_3_check_catches_an_optimizer_state_defect).
ROUNDING_FACTOR = 8
#: The floor itself must stay a rounding floor: the control's step 1 within GRAD_RTOL of TP1's,
#: and its step 3 under this (measured 1.1e-5-8.3e-5 over the ten GRPO/RMT cells).
FLOOR_MAX = 1e-4
#: fp64 cells: measured <= 1.6e-13.
FP64_RTOL = 1e-9
#: u32 / u64: an fp32 step-3 excess that rounding explains is about this times the fp64 one.
ROUNDOFF_RATIO = 2.0 ** 29
#: ... within this factor either way (measured 0.26-2.0 over the fp64 cells).
ROUNDOFF_SLACK = 16
#: 30-step trajectories over the bound: none since the trajectory runs use lr 1e-3 (see METHODS
#: in conftest.py: at 3e-3 TP1 against TP1 with another micro-batch split already drifts 1.3e-4).
TRAJECTORY_OVER: set = set()


def _grads(run: dict) -> dict:
    return torch.load(run["grads"], weights_only=False)


def _cell(layout_runs, family: str, method: str, layout: str, variant: str | None = None) -> dict:
    """The run of one cell (``variant``: "fp64", "nudged" for the TP1 rounding control, or
    "moment_defect" for the deliberately defective TP2 run)."""
    return layout_runs(layout, (family, method) in EXTENDED_CELLS)[(family, method) + ((variant,) if variant else ())]


def worst(got: FullGradients, ref: FullGradients) -> tuple[float, str]:
    """(worst per-parameter relative difference, its parameter)."""
    diffs = compare(got, ref)
    name, value = max(diffs.items(), key=lambda kv: kv[1])
    return value, name[0] + ("" if name[1] is None else f" (layer {name[1]})")


def rounding_floor(layout_runs, family: str, method: str, step: int) -> float:
    """The worst per-parameter difference, at ``step``, between the cell at TP1 and the same
    cell at TP1 started one ulp away: how far fp32 rounding alone carries this run."""
    base = _grads(_cell(layout_runs, family, method, "tp1"))
    control = _grads(_cell(layout_runs, family, method, "tp1", "nudged"))
    return worst(control[step], base[step])[0]


CELLS = [pytest.param(f, m, id=f"{f}-{m}") for f, m in CORE_CELLS] + [
    pytest.param(f, m, id=f"{f}-{m}", marks=[pytest.mark.slow]) for f, m in EXTENDED_CELLS
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family, method", CELLS)
def test_every_parameter_gradient_matches_tp1(family, method, layout, layout_runs):
    if (method, layout) in NOT_INVARIANT:
        pytest.skip(f"{method} at {layout}: {NOT_INVARIANT[(method, layout)]}")
    base_grads = _grads(_cell(layout_runs, family, method, "tp1"))
    got_grads = _grads(_cell(layout_runs, family, method, layout))
    assert sorted(got_grads) == sorted(base_grads) == list(CAPTURED)
    for step in CAPTURED:
        ref = base_grads[step]
        # Every parameter of every layer is there and really has a gradient to compare.
        assert len(ref.tensors) >= 8 and all(t.norm() > 0 for t in ref.tensors.values()), step
        bound, floor = GRAD_RTOL, None
        if method in ROUNDING_CONTROL_METHODS and step > 1:
            floor = rounding_floor(layout_runs, family, method, step)
            bound = GRAD_RTOL + ROUNDING_FACTOR * floor
        value, where = worst(got_grads[step], ref)
        print(f"{family}/{method}/{layout} step {step}: worst per-parameter relative difference {value:.2e} ({where})"
              + ("" if floor is None else f"; rounding floor {floor:.2e} ({value / floor:.2f}x), bound {bound:.2e}"))
        diffs = compare(got_grads[step], ref)
        bad = {k: v for k, v in diffs.items() if not v <= bound}
        assert not bad, f"{family}/{method}/{layout} step {step}: {sorted(bad.items(), key=lambda kv: -kv[1])[:5]}"
        spread = got_grads[step].replica_spread
        assert all(v <= 1e-6 * max(1.0, ref.tensors[k].abs().max().item()) for k, v in spread.items()), spread
    # The runs took steps (an optimizer that never moved would make step 3 equal step 1).
    assert max(compare(base_grads[3], base_grads[1]).values()) > 1e-3


CONTROLLED = [c for c in CELLS if c.values[1] in ROUNDING_CONTROL_METHODS]


@pytest.mark.parametrize("family, method", CONTROLLED)
def test_rounding_control_is_the_same_model_one_ulp_away(family, method, layout_runs):
    """The floor is a rounding floor: the one-ulp control moved the run (it differs from TP1)
    yet its step-1 gradients match TP1's within GRAD_RTOL, and step 3 stays under FLOOR_MAX."""
    base = _grads(_cell(layout_runs, family, method, "tp1"))
    control = _grads(_cell(layout_runs, family, method, "tp1", "nudged"))
    step1, step3 = worst(control[1], base[1])[0], worst(control[3], base[3])[0]
    print(f"{family}/{method}: TP1 one ulp away differs from TP1 by {step1:.2e} at step 1, {step3:.2e} at step 3")
    assert 0 < step1 <= GRAD_RTOL
    assert step3 <= FLOOR_MAX


def test_step_3_check_catches_an_optimizer_state_defect(layout_runs):
    """The rounding-floor bound still sees a defect that only later steps carry: TP2 with TP rank
    1's Adam first moments scaled by 0.99 after step 1 (step 1's gradients untouched; measured
    1.6e-3 at step 3, 12x the bound of 1.4e-4)."""
    family, method = DEFECT_CELL
    base = _grads(_cell(layout_runs, family, method, "tp1"))
    defective = _grads(_cell(layout_runs, family, method, "tp2", "moment_defect"))
    bound = GRAD_RTOL + ROUNDING_FACTOR * rounding_floor(layout_runs, family, method, 3)
    step1, step3 = worst(defective[1], base[1])[0], worst(defective[3], base[3])[0]
    print(f"{family}/{method}/tp2 with a 1% Adam-moment defect: step 1 {step1:.2e}, step 3 {step3:.2e} "
          f"(bound {bound:.2e}, {step3 / bound:.1f}x)")
    assert step1 <= GRAD_RTOL
    assert step3 > 4 * bound


FP64_PARAMS = [pytest.param(f, m, id=f"{f}-{m}") for f, m in FP64_CELLS] + [
    pytest.param(f, m, id=f"{f}-{m}", marks=[pytest.mark.slow]) for f, m in FP64_EXTENDED_CELLS]


@pytest.mark.parametrize("layout", [lay for lay in FP64_LAYOUTS if lay != "tp1"])
@pytest.mark.parametrize("family, method", FP64_PARAMS)
def test_fp64_every_parameter_gradient_matches_tp1(family, method, layout, layout_runs):
    """In fp64 (parameters, gradients, losses, clipping norm) the layouts agree to rounding, and
    the fp32 step-3 difference of the same cell is that rounding scaled by u32 / u64."""
    if (method, layout) in NOT_INVARIANT:
        pytest.skip(f"{method} at {layout}: {NOT_INVARIANT[(method, layout)]}")
    base_grads = _grads(_cell(layout_runs, family, method, "tp1", "fp64"))
    got_grads = _grads(_cell(layout_runs, family, method, layout, "fp64"))
    fp32_base = _grads(_cell(layout_runs, family, method, "tp1"))
    fp32_got = _grads(_cell(layout_runs, family, method, layout))
    assert sorted(got_grads) == sorted(base_grads) == list(CAPTURED)
    for step in CAPTURED:
        ref = base_grads[step]
        assert all(t.dtype == torch.float64 and t.norm() > 0 for t in ref.tensors.values()), step
        assert all(t.dtype == torch.float64 for t in got_grads[step].tensors.values()), step
        value, where = worst(got_grads[step], ref)
        fp32_value = worst(fp32_got[step], fp32_base[step])[0]
        ratio = fp32_value / value if value > 0 else float("inf")
        print(f"{family}/{method}/{layout} fp64 step {step}: worst per-parameter relative difference {value:.2e} "
              f"({where}); fp32 {fp32_value:.2e}, fp32/fp64 = {ratio:.2e} (u32/u64 = {ROUNDOFF_RATIO:.2e})")
        diffs = compare(got_grads[step], ref)
        bad = {k: v for k, v in diffs.items() if not v <= FP64_RTOL}
        assert not bad, f"{family}/{method}/{layout} fp64 step {step}: {sorted(bad.items(), key=lambda kv: -kv[1])[:5]}"
        assert all(v <= 1e-12 for v in got_grads[step].replica_spread.values()), got_grads[step].replica_spread
        # An fp32 excess over GRAD_RTOL must be rounding: it shrinks by u32/u64 in fp64. A defect of
        # the fp32 path (a dtype-dependent cast, a reduction in lower precision) would not.
        if fp32_value > GRAD_RTOL:
            assert fp32_value <= ROUNDOFF_SLACK * ROUNDOFF_RATIO * value, (step, fp32_value, value)
        # The fp32 run computes what the fp64 run computes: step 1 to GRAD_RTOL.
        if step == 1:
            assert max(compare(fp32_base[1], ref).values()) <= GRAD_RTOL
    assert max(compare(base_grads[3], base_grads[1]).values()) > 1e-3


TRAJECTORY_CELLS = [
    pytest.param(f, lay, id=f"{f}-{lay}", marks=[pytest.mark.xfail(
        reason="measured over the 30-step bound (see TRAJECTORY_OVER)", strict=False)] if (f, lay) in TRAJECTORY_OVER else [])
    for f in FAMILIES for lay in ("tp2", "pp2")
]


@pytest.mark.parametrize("family, layout", TRAJECTORY_CELLS)
def test_30_step_loss_trajectory_matches_tp1(family, layout, layout_runs):
    baseline = _cell(layout_runs, family, "ntp", "tp1")["records"]
    records = _cell(layout_runs, family, "ntp", layout)["records"]
    steps = list(range(1, TRAJECTORY_STEPS + 1))
    assert [r["step"] for r in records] == [r["step"] for r in baseline] == steps
    worst = max(abs(got["loss"] - ref["loss"]) / abs(ref["loss"]) for ref, got in zip(baseline, records))
    print(f"{family} {layout}: max relative loss difference over {TRAJECTORY_STEPS} steps = {worst:.2e}")
    assert worst <= TRAJECTORY_RTOL
    for ref, got in zip(baseline, records):
        assert math.isclose(got["grad_norm"], ref["grad_norm"], rel_tol=GRAD_NORM_RTOL), ref["step"]
    # The model must actually be learning, or equal losses would prove little.
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
