"""The embedded demo's ReMiT path: base, sft and the GRPO-tuned reference built on first use, then reused."""

import os

import yaml

from megatron_midtrain.testing.distributed import run_distributed


def _demo_remit(run_dir, cache_dir):
    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.testing.runs import TEST_OVERRIDES
    from megatron_midtrain.training import demo_models
    from megatron_midtrain.training.metrics import read_metrics
    from megatron_midtrain.training.trainer import Trainer

    # tiny, for the test (the GRPO stage runs the real rollout loop and held-out evaluation at DP2)
    demo_models.BASE_STEPS, demo_models.GRPO_STEPS = 3, 2
    demo_models.GRPO_DEMO = dict(prompts_per_step=2, group_size=4, max_new_tokens=12, eval_problems=6, rollout_micro_batch_size=2)
    cfg = load_config(TEST_OVERRIDES + [f"run.dir={run_dir}", f"run.cache_dir={cache_dir}", "train.max_steps=2",
                                          "data.demo_sft_steps=2"])
    assert cfg.method.name == "remit"  # the default method
    cfg = demo_models.with_demo_reference(cfg)
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    ref_records = read_metrics(cfg.reference.checkpoint)
    return {"reference": cfg.reference.checkpoint, "init_from": cfg.train.init_from, "records": read_metrics(run_dir),
            "ref_records": ref_records}


def test_default_method_on_demo_builds_and_uses_demo_reference(tmp_path):
    from megatron_midtrain.data.demo import ensure_demo_assets

    cache = os.environ["MIDTRAIN_CACHE"]
    ensure_demo_assets(cache)
    out = run_distributed(_demo_remit, 2, str(tmp_path / "run"), cache)[0]
    base, ref = out["init_from"], out["reference"]
    assert os.path.basename(base) == "base" and os.path.basename(ref) == "reference-sft2"
    ref_cfg = yaml.safe_load(open(os.path.join(ref, "config.yaml")))
    sft = os.path.join(os.path.dirname(ref), "sft-2")  # data.demo_sft_steps=2
    sft_cfg = yaml.safe_load(open(os.path.join(sft, "config.yaml")))
    assert sft_cfg["data"]["demo_math_weight"] == 1.0 and sft_cfg["train"]["init_from"] == base
    assert sft_cfg["train"]["max_steps"] == 2
    # half the run's batch, one micro-batch per DP rank (the same losses as smaller ones, faster)
    run_batch = yaml.safe_load(open(os.path.join(base, "config.yaml")))["train"]["global_batch_tokens"]
    assert sft_cfg["train"]["global_batch_tokens"] == run_batch // 2
    assert sft_cfg["train"]["micro_batch_size"] * sft_cfg["data"]["seq_length"] * 2 == run_batch // 2
    # the reference is the sft model after verifiable-task GRPO (exact-match rewards, held-out accuracy)
    assert ref_cfg["method"]["name"] == "grpo" and ref_cfg["train"]["init_from"] == sft
    ref_records = out["ref_records"]
    assert [r["step"] for r in ref_records] == [1, 2]
    assert "rl/heldout_accuracy_before" in ref_records[0] and "rl/heldout_accuracy" in ref_records[-1]
    assert {"rl/reward_mean", "rl/accuracy", "rl/gen_tokens_per_s", "rl/gen_time_frac"} <= ref_records[0].keys()
    assert ref_records[0]["rl/response_len"] > 0
    records = out["records"]
    assert [r["step"] for r in records] == [1, 2]
    assert {"remit/w_mean", "remit/w_std", "remit/frac_low", "remit/frac_high", "remit/delta_mean"} <= records[0].keys()
    assert records[0]["remit/w_std"] > 0  # the reference really differs from the policy
    # second use: nothing is rebuilt (the cached checkpoints are reused as they are)
    mtime = os.path.getmtime(os.path.join(ref, "checkpoints", "latest"))
    out2 = run_distributed(_demo_remit, 1, str(tmp_path / "run2"), cache)[0]
    assert out2["reference"] == ref and os.path.getmtime(os.path.join(ref, "checkpoints", "latest")) == mtime
