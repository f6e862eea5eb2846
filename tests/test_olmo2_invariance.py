"""OLMo-2 blocks: post-norms and a full-width QK-norm (their layout parity is in test_grad_parity.py)."""

from megatron_midtrain.testing.distributed import run_distributed


def test_olmo2_model_has_post_norms_and_full_width_qk_norm():
    out = run_distributed(_param_names, 2)
    names0, names1 = out
    assert any(n.endswith("self_attention.post_norm.weight") for n in names0)
    assert any(n.endswith("mlp.post_norm.weight") for n in names0)
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in names0)
    # full-width q norm: 4 heads x 32 dims = 128 wide, the whole weight on each TP rank (each
    # uses its heads' half; megatron sums q/k-norm gradients over TP)
    assert names0["decoder.layers.0.self_attention.q_layernorm.weight"] == (128,)
    assert names1["decoder.layers.0.self_attention.k_layernorm.weight"] == (128,)
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
