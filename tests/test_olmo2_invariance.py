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


def test_full_width_qk_norm_keeps_fp64_and_normalises_bf16_in_fp32():
    """The full-width QK-norm at TP2 equals the unsharded formula: to fp64 rounding for fp64
    inputs (it used to compute in fp32 whatever the input, 1e-7 off, which the slow fp64 parity
    cells of OLMo-2 GRPO/RMT found at 1e-5 after three steps), and in fp32 for bf16 inputs."""
    out = run_distributed(_qk_norm_errors, 2)
    for rank in out:
        assert rank["fp64_dtype"] == "torch.float64" and rank["fp64_error"] <= 1e-13, rank
        assert rank["bf16_dtype"] == "torch.bfloat16" and rank["bf16_mismatch"] == 0, rank


def _qk_norm_errors():
    import torch
    from megatron.core import parallel_state

    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.model.builder import build_transformer_config
    from megatron_midtrain.model.olmo2 import FullWidthQKNorm
    from megatron_midtrain.training.distributed import init_distributed

    cfg = load_config(["model=olmo2_tiny", "parallel.tp=2"])
    init_distributed(cfg)
    rank = parallel_state.get_tensor_model_parallel_rank()
    heads, dim, eps = cfg.model.num_attention_heads, 32, 1e-6
    result = {}
    for name, dtype in (("fp64", torch.float64), ("bf16", torch.bfloat16)):
        norm = FullWidthQKNorm(build_transformer_config(cfg.model, cfg.parallel, dtype), dim, eps, heads="q")
        gen = torch.Generator().manual_seed(3)
        full_x = (torch.randn(5, 2, heads, dim, generator=gen, dtype=torch.float64) * 3.0).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(heads * dim, generator=gen, dtype=torch.float64).to(dtype) + 0.5)
        local = heads // 2
        got = norm(full_x[:, :, rank * local:(rank + 1) * local])
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        flat = full_x.reshape(5, 2, heads * dim).to(compute)
        ref = (flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + eps) * norm.weight.to(compute))
        ref = ref.to(dtype).reshape(5, 2, heads, dim)[:, :, rank * local:(rank + 1) * local]
        result[f"{name}_dtype"] = str(got.dtype)
        if dtype == torch.float64:
            result["fp64_error"] = float((got - ref).norm() / ref.norm())
        else:  # rounded to bf16 from fp32 either way: at most the odd last-bit tie
            result["bf16_mismatch"] = int((got != ref).sum())
    return result
