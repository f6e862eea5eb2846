"""OLMo-2 blocks (post-norm, full-width QK-norm with a TP all-reduce) train identically at TP1/TP2/PP2."""

import pytest

from megatron_midtrain.testing.distributed import run_distributed

@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_olmo2_layout_invariance(layout, layout_runs):
    """model=olmo2_tiny, 4 steps (conftest EXPERIMENTS), against TP1."""
    baseline, records = layout_runs("tp1")["olmo2"], layout_runs(layout)["olmo2"]
    assert [r["step"] for r in records] == [r["step"] for r in baseline] == [1, 2, 3, 4]
    # Step 1 checks the TP backward (incl. the all-reduced QK-norm statistic) before any
    # optimizer drift: the gradient norm must agree to fp32 round-off.
    assert records[0]["grad_norm"] == pytest.approx(baseline[0]["grad_norm"], rel=1e-5)
    for ref, got in zip(baseline, records):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), ref["step"]
    assert records[-1]["loss"] < records[0]["loss"]


def test_olmo2_model_has_post_norms_and_full_width_qk_norm():
    out = run_distributed(_param_names, 2)
    names0, names1 = out
    assert any(n.endswith("self_attention.post_norm.weight") for n in names0)
    assert any(n.endswith("mlp.post_norm.weight") for n in names0)
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in names0)
    # full-width q norm: 4 heads x 32 dims = 128 wide, half of it per TP rank
    assert names0["decoder.layers.0.self_attention.q_layernorm.weight"] == (64,)
    assert names1["decoder.layers.0.self_attention.k_layernorm.weight"] == (64,)
    assert "output_layer.weight" in names0


def _param_names():
    import torch

    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.model.builder import build_gpt_stage, build_transformer_config
    from megatron_midtrain.training.distributed import init_distributed

    cfg = load_config(["model=olmo2_tiny", "parallel.tp=2"])
    init_distributed(cfg)
    stage = build_gpt_stage(cfg.model, build_transformer_config(cfg.model, cfg.parallel, torch.float32), 64, use_te=False)
    return {n: tuple(p.shape) for n, p in stage.named_parameters()}
