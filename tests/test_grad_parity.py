"""The same model at any layout, parameter by parameter (gloo, CPU, fp32; some cells also fp64).

For every model family x method x layout of conftest's parity matrix, every parameter's full
gradient after step 1 and after step 3 (when the optimizer state has acted twice) must match
the TP1/PP1/DP1 run: ``||g - g_ref|| / ||g_ref|| <= 1e-5`` per parameter and layer. GRPO and
RMT (CLIP_NORM_NOISE) differ by more in fp32 through one scalar, the clipping coefficient, whose
fp32 grad norm is layout-dependent to ~2e-5 on the CPU: they must match at step 1 once that scalar
is divided out, within 2e-4 raw, and, in fp64 at TP2/PP2/DP2, to 1e-9. Replicas of
one tensor (DP copies, TP-replicated norms, the tied head) must agree with each other. For each
family, the 30-step NTP loss trajectory at TP2 and at PP2 must stay within 1e-6 of TP1's
(the issue asks for 1e-4).

Regressions these caught (each failed before its fix):
* OLMo-2's full-width QK-norm weight, sharded over TP, had its gradient SUM-reduced over TP by
  megatron's name-based ``q_layernorm``/``k_layernorm`` rule, which added the two ranks'
  *different* slices together (relative difference 1.0 at TP2, invisible in the loss at step 1);
* the post-norm weights (and every RMSNorm of the local spec) were not tagged
  ``sequence_parallel``, so under sequence parallelism each TP rank kept only its part of the
  sequence's gradient (0.5-0.66 relative at TP2+SP; replicas disagreed);
* (fp64 cells, slow) OLMo-2's full-width QK-norm computed in fp32 even for fp64 inputs, so its
  fp64 GRPO/RMT gradients differed from TP1's by 2.6e-7 at step 1 and 1.0e-5 at step 3 (TP2),
  against <= 1.6e-13 once it keeps fp64 (tests/test_olmo2_invariance.py has the unit check).
"""

import math

import pytest
import torch

from conftest import (CORE_CELLS, EXTENDED_CELLS, FAMILIES, FP64_CELLS, FP64_EXTENDED_CELLS, FP64_LAYOUTS, NOT_INVARIANT,
                      TRAJECTORY_STEPS)

from megatron_midtrain.testing.grads import FullGradients, compare

GRAD_RTOL = 1e-5
#: The issue asks for 1e-4; measured after the fixes: <= 6.9e-8 for every family at TP2 and PP2.
#: 1e-6 also catches the OLMo-2 QK-norm bug on its own (before the fix: 5.7e-6 at TP2 over these
#: 30 steps at lr 1e-3; 2.4e-3 at the default lr).
TRAJECTORY_RTOL = 1e-6
GRAD_NORM_RTOL = 1e-3
LAYOUTS = ("tp2", "pp2", "dp2", "tp2pp2", "tp2sp")
CAPTURED = (1, 3)


def _grads(run: dict) -> dict:
    return torch.load(run["grads"], weights_only=False)


def _cell(layout_runs, family: str, method: str, layout: str, fp64: bool = False) -> dict:
    return layout_runs(layout, (family, method) in EXTENDED_CELLS)[(family, method) + (("fp64",) if fp64 else ())]


def unit_gradients(grads: FullGradients) -> FullGradients:
    """``grads`` divided by its global norm (fp64): what is left once the clipping coefficient,
    one scalar for the whole model, is taken out."""
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in grads.tensors.values()))
    return FullGradients(tensors={k: t.double() / norm for k, t in grads.tensors.items()})


def worst_difference(layout_runs, family: str, method: str, layout: str, fp64: bool = False,
                     steps=CAPTURED, scale_free: bool = False) -> tuple[float, str, float]:
    """(worst relative difference, its parameter, worst replica spread) over ``steps``
    (``scale_free``: of :func:`unit_gradients`)."""
    base = _grads(_cell(layout_runs, family, method, "tp1", fp64))
    got = _grads(_cell(layout_runs, family, method, layout, fp64))
    worst, where, spread = 0.0, "", 0.0
    for step in steps:
        g, b = (unit_gradients(got[step]), unit_gradients(base[step])) if scale_free else (got[step], base[step])
        diffs = compare(g, b)
        name, value = max(diffs.items(), key=lambda kv: kv[1])
        if value >= worst:
            worst, where = value, f"step {step}: {name[0]}" + ("" if name[1] is None else f" (layer {name[1]})")
        spread = max([spread] + list(got[step].replica_spread.values()))
    return worst, where, spread


#: Methods whose fp32 gradients differ from TP1's by more than GRAD_RTOL, through one scalar:
#: the gradient-clipping coefficient (issue 12). These runs clip (grad norm 3.3-4.4 > clip_grad
#: 1.0), and on the CPU megatron computes the norm with ``torch.norm`` of each fp32 gradient
#: (``local_multi_tensor_l2_norm``), whose error grows with the tensor and its dynamic range:
#: on the tied embedding's GRPO gradient (2048 x 128) it is 6.6e-5 relative (an exact fp32 sum
#: of squares: 2e-8). The clipped fp32 gradient's norm is then 1.000026 instead of 1 at TP1
#: (GRPO), 1.000011 at TP2 (half the vocabulary rows per rank), so *every* parameter differs by
#: that ratio, 1.5e-5 (RMT 1.4e-5; NTP's gradient has less dynamic range: 1.4e-6). The
#: input-norm weights only top the list by a hair. Measured (llama, step 1, TP2 vs TP1):
#: dividing each run's gradients by their global norm leaves <= 4.3e-7 (GRPO), 7.0e-7 (RMT),
#: 3.2e-7 (NTP); in fp64 (``train_and_capture_fp64``, norm in fp64 too) TP2, PP2 and DP2 agree
#: with TP1 to <= 1.3e-15 at step 1 and 7.4e-14 at step 3, so there is no layout bug. It is
#: not cancellation either: the fp32 gradient's direction agrees with the fp64 one to 5.9e-7
#: (GRPO), 8.5e-7 (RMT) at TP1. Step 3 inherits what steps 1-2 left through Adam, which these
#: RL trajectories amplify 20-60x (fp64: GRPO 7.7e-16 -> 1.4e-14 at PP2, 1.2e-15 -> 7.4e-14
#: at TP2; fp32 at PP2 and DP2, where the clip coefficients agree to 1e-7: 3.3e-7 -> 1.5e-5 on
#: layer 0's linear_qkv.layer_norm_weight; NTP 2.3e-7 -> 2.7e-7). So these methods are checked
#: here at step 1 without the scalar (GRAD_RTOL) and at every step within CLIP_NOISE_RTOL, and
#: exactly in fp64 by test_fp64_every_parameter_gradient_matches_tp1.
#: Since then the CPU clipping norm itself accumulates in fp64 (utils/cpu_compat.py, tested in
#: test_cpu_compat.py), which removes the layout dependence of the clip coefficient at its
#: source; the figures above were measured before that fix. After it, step 1 meets GRAD_RTOL raw
#: as well (llama: <= 7.1e-7 GRPO/RMT; every family: <= 2.0e-6), which the test now asserts; step
#: 3 keeps the Adam-amplified rounding (up to 8.6e-5, see below), hence CLIP_NOISE_RTOL there.
CLIP_NORM_NOISE = {"grpo", "rmt"}
#: Measured (llama, raw fp32, steps 1 and 3): <= 1.7e-5 at every layout; 2e-4 still catches a
#: wrongly reduced shard (0.5-1.0, see above) by three orders of magnitude.
CLIP_NOISE_RTOL = 2e-4
#: fp64 cells (conftest.FP64_CELLS, and FP64_EXTENDED_CELLS in the slow worlds): measured <= 7.4e-14.
FP64_RTOL = 1e-9
#: The extended (slow) GRPO/RMT cells, re-measured after the fp64 clipping norm (``pytest -m slow
#: tests/test_grad_parity.py -s``, this 2-core CPU machine): step 1 raw <= 2.0e-6 (olmo2/grpo at
#: TP2), without the clip coefficient <= 2.0e-6, step 3 raw <= 8.6e-5 (qwen3/rmt at PP2); they
#: meet the same criteria as the core cells (until then they were non-strict xfails).
#: 30-step trajectories over the bound: none since the trajectory runs use lr 1e-3 (see METHODS
#: in conftest.py: at 3e-3 TP1 against TP1 with another micro-batch split already drifts 1.3e-4).
TRAJECTORY_OVER: set = set()


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
    worst, where, _ = worst_difference(layout_runs, family, method, layout)
    print(f"{family}/{method}/{layout}: worst per-parameter relative difference {worst:.2e} ({where})")
    noisy = method in CLIP_NORM_NOISE
    if noisy:
        scale_free, sf_where, _ = worst_difference(layout_runs, family, method, layout, steps=(1,), scale_free=True)
        print(f"{family}/{method}/{layout}: without the clip coefficient {scale_free:.2e} ({sf_where})")
        assert scale_free <= GRAD_RTOL, f"{family}/{method}/{layout}: step 1 without the clip coefficient: {sf_where}"
        # With the fp64-accumulated clipping norm the clip coefficient itself agrees across
        # layouts, so step 1's raw gradients meet the fp32 bound too (only later steps carry
        # the Adam-amplified rounding, checked at CLIP_NOISE_RTOL below).
        raw1, raw1_where, _ = worst_difference(layout_runs, family, method, layout, steps=(1,))
        print(f"{family}/{method}/{layout}: step 1 raw {raw1:.2e} ({raw1_where})")
        assert raw1 <= GRAD_RTOL, f"{family}/{method}/{layout}: step 1 raw gradients: {raw1_where} {raw1:.2e}"
    for step in CAPTURED:
        ref = base_grads[step]
        # Every parameter of every layer is there and really has a gradient to compare.
        assert len(ref.tensors) >= 8 and all(t.norm() > 0 for t in ref.tensors.values()), step
        diffs = compare(got_grads[step], ref)
        bad = {k: v for k, v in diffs.items() if not v <= (CLIP_NOISE_RTOL if noisy else GRAD_RTOL)}
        assert not bad, f"{family}/{method}/{layout} step {step}: {sorted(bad.items(), key=lambda kv: -kv[1])[:5]}"
        spread = got_grads[step].replica_spread
        assert all(v <= 1e-6 * max(1.0, ref.tensors[k].abs().max().item()) for k, v in spread.items()), spread
    # The runs took steps (an optimizer that never moved would make step 3 equal step 1).
    assert max(compare(base_grads[3], base_grads[1]).values()) > 1e-3


FP64_PARAMS = [pytest.param(f, m, id=f"{f}-{m}") for f, m in FP64_CELLS] + [
    pytest.param(f, m, id=f"{f}-{m}", marks=[pytest.mark.slow]) for f, m in FP64_EXTENDED_CELLS]


@pytest.mark.parametrize("layout", [lay for lay in FP64_LAYOUTS if lay != "tp1"])
@pytest.mark.parametrize("family, method", FP64_PARAMS)
def test_fp64_every_parameter_gradient_matches_tp1(family, method, layout, layout_runs):
    """In fp64 (parameters, gradients, losses, clipping norm) the layouts agree to rounding."""
    if (method, layout) in NOT_INVARIANT:
        pytest.skip(f"{method} at {layout}: {NOT_INVARIANT[(method, layout)]}")
    base_grads = _grads(_cell(layout_runs, family, method, "tp1", fp64=True))
    got_grads = _grads(_cell(layout_runs, family, method, layout, fp64=True))
    assert sorted(got_grads) == sorted(base_grads) == list(CAPTURED)
    worst, where, spread = worst_difference(layout_runs, family, method, layout, fp64=True)
    print(f"{family}/{method}/{layout} fp64: worst per-parameter relative difference {worst:.2e} ({where}), "
          f"replica spread {spread:.1e}")
    fp32 = _grads(_cell(layout_runs, family, method, "tp1"))
    for step in CAPTURED:
        ref = base_grads[step]
        assert all(t.dtype == torch.float64 and t.norm() > 0 for t in ref.tensors.values()), step
        assert all(t.dtype == torch.float64 for t in got_grads[step].tensors.values()), step
        diffs = compare(got_grads[step], ref)
        bad = {k: v for k, v in diffs.items() if not v <= FP64_RTOL}
        assert not bad, f"{family}/{method}/{layout} fp64 step {step}: {sorted(bad.items(), key=lambda kv: -kv[1])[:5]}"
        assert all(v <= 1e-12 for v in got_grads[step].replica_spread.values()), got_grads[step].replica_spread
        # The fp64 run is the fp32 run's computation: they agree to the fp32 clip-norm noise.
        assert max(compare(fp32[step], ref).values()) <= CLIP_NOISE_RTOL, step
    # Step 1 in fp32 without the clip coefficient is the fp64 gradient's direction (no
    # cancellation amplifies fp32 rounding; measured 5.9e-7 GRPO, 8.5e-7 RMT).
    assert max(compare(unit_gradients(fp32[1]), unit_gradients(base_grads[1])).values()) <= GRAD_RTOL
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
