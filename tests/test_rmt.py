"""RMT / GRPO rollout loop: parallel invariance for fixed rollouts, the demo paths, bad input (CPU, gloo)."""

import json
import os

import numpy as np
import pytest

from megatron_midtrain.testing.distributed import run_distributed

VOCAB = 2048


def fake_entropy_index(prefix: str, out: str) -> str:
    """An entropy index whose bucket is ``token_id % 3`` (aligned with the dataset, as the tool writes it)."""
    from megatron_midtrain.rl import entropy as ent

    info = ent.dataset_alignment(prefix)
    tokens = np.memmap(prefix + ".bin", dtype=np.dtype(info["token_dtype"]), mode="r")
    os.makedirs(out, exist_ok=True)
    np.save(os.path.join(out, ent.ENTROPY_FILE), tokens.astype(np.float32))
    np.save(os.path.join(out, ent.BUCKETS_FILE), (tokens % 3).astype(np.uint8))
    with open(os.path.join(out, ent.META_FILE), "w") as fh:
        json.dump({"format": ent.FORMAT, "complete": True, "dataset": info}, fh)
    return out


def _fake_rollouts(step, prompt_rows, params=None, seed=None):
    """Deterministic responses of varied length; some end with EOD (id 2)."""
    from megatron_midtrain.rl.generation import GenerationResult

    responses, reasons = [], []
    for i, _ in enumerate(prompt_rows):
        rng = np.random.default_rng([step, i])
        n = int(rng.integers(1, 9))
        resp = rng.integers(4, 600, size=n).tolist()
        if i % 3 == 0:
            resp[-1] = 2
        responses.append(resp)
        reasons.append("eos" if resp[-1] == 2 else "length")
    return GenerationResult(responses=responses, finish_reasons=reasons,
                            generated_tokens=sum(map(len, responses)), seconds=1e-3)


RMT_TEST = [
    "method=rmt", "method.prompts_per_step=4", "method.group_size=4", "method.rollout_micro_batch_size=4",
    "method.max_new_tokens=8", "method.prompt_template='{context}'", "method.answer_format=plain",
    "method.context_tokens=32", "method.budget_b0=4", "method.budget_gamma=0.5", "train.max_steps=2",
    "optimizer.lr=1e-3", "schedule.warmup_steps=0",  # step 1 really updates the weights
]


def _train_fixed(overrides, keep_distributed=False):
    import torch.distributed as dist

    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.testing.runs import with_test_defaults
    from megatron_midtrain.training.metrics import read_metrics
    from megatron_midtrain.training.trainer import Trainer

    cfg = load_config(with_test_defaults(overrides))
    trainer = Trainer(cfg)
    trainer.method_step.rollouts = _fake_rollouts
    try:
        trainer.train()
        rank0 = dist.get_rank() == 0
    finally:
        trainer.close(keep_distributed=keep_distributed)
    return read_metrics(cfg.run.dir) if rank0 else None


def _train_fixed_then_update_direction(overrides, direction_overrides):
    """The fixed-rollout run, then one GRPO-only step (λ = 0) whose effect on the log-probs of its
    own rollouts is measured: the masked labels must be the responses, and the update must raise
    the advantage-weighted log-probs (the surrogate objective), more so for A > 0 than A < 0."""
    import torch
    import torch.distributed as dist

    import megatron_midtrain.rl.step as rl_step
    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.testing.runs import with_test_defaults
    from megatron_midtrain.training.trainer import Trainer

    records = _train_fixed(overrides, keep_distributed=True)
    captured = {}
    build_batches = rl_step.rollout_micro_batches

    def spy(prompts, responses, *args, **kwargs):
        batches = build_batches(prompts, responses, *args, **kwargs)
        # the policy's log-probs of its own rollouts before the update (one update: none are recorded)
        before = trainer.method_step.rollout_logprobs(trainer.model, batches)
        captured.update(batches=batches, before=before, responses=responses)
        return batches

    rl_step.rollout_micro_batches = spy
    trainer = Trainer(load_config(with_test_defaults(direction_overrides)))
    trainer.method_step.rollouts = _fake_rollouts
    try:
        trainer.train_step()
        batches = captured["batches"]
        new = trainer.method_step.rollout_logprobs(trainer.model, batches)
        delta, adv = [], []
        for b, lp, lp0 in zip(batches, new, captured["before"]):
            delta.append(((lp - lp0) * b["loss_mask"]).sum(-1))
            adv.append(b["advantages"])
        rows = [row for b in batches for row in zip(b["labels"], b["loss_mask"])]
        masked = [lab[m > 0].tolist() for lab, m in rows]
        rank0 = dist.get_rank() == 0
    finally:
        rl_step.rollout_micro_batches = build_batches
        trainer.close()
    return {"records": records, "masked_labels": masked, "responses": captured["responses"],
            "delta": torch.cat(delta).tolist(), "advantages": torch.cat(adv).tolist()} if rank0 else None


def _train_fixed_and_kl(overrides, root):
    """The fixed-rollout run, then the same with a k3 KL (beta > 0) to the initial policy."""
    from megatron_midtrain.testing.runs import save_initial_checkpoint

    plain = _train_fixed(overrides + [f"run.dir={root}/plain"], keep_distributed=True)
    ref = save_initial_checkpoint(RMT_TEST[:1] + [o for o in overrides if o.startswith("method.entropy_dirs")]
                                  + [f"run.dir={root}/init"], keep_distributed=True)
    kl = _train_fixed(overrides + [f"run.dir={root}/kl", "method.kl_beta=0.5", f"reference.checkpoint={ref}"])
    return {"plain": plain, "kl": kl}


@pytest.fixture(scope="module")
def entropy_dirs(tmp_path_factory):
    from megatron_midtrain.data.demo import ensure_demo_assets

    assets = ensure_demo_assets(os.environ["MIDTRAIN_CACHE"])
    root = tmp_path_factory.mktemp("entropy")
    return [fake_entropy_index(str(assets.prose_prefix), str(root / "prose")),
            fake_entropy_index(str(assets.math_prefix), str(root / "math"))]


def test_rl_plus_ntp_loss_is_parallel_invariant_for_fixed_rollouts(tmp_path, entropy_dirs):
    dirs = f"method.entropy_dirs=[{entropy_dirs[0]},{entropy_dirs[1]}]"
    runs = {}
    tp1 = run_distributed(_train_fixed_and_kl, 1, RMT_TEST + [dirs], str(tmp_path / "tp1"))[0]
    runs["tp1"] = tp1["plain"]
    # TP2 also takes one GRPO-only step and measures its effect on its own rollouts' log-probs
    direction = RMT_TEST + [dirs, f"run.dir={tmp_path / 'direction'}", "parallel.tp=2", "method.ntp_weight=0", "optimizer.lr=1e-4"]
    tp2 = run_distributed(_train_fixed_then_update_direction, 2, RMT_TEST + [dirs, f"run.dir={tmp_path / 'tp2'}", "parallel.tp=2"],
                          direction)[0]
    runs["tp2"] = tp2["records"]
    runs["pp2"] = run_distributed(_train_fixed, 2, RMT_TEST + [dirs, f"run.dir={tmp_path / 'pp2'}", "parallel.pp=2"])[0]
    # k3 KL to the initial policy: exactly 0 before the first update, positive after it, and
    # beta * KL enters the loss (the policy-gradient part is the same at step 1)
    kl = tp1["kl"]
    assert kl[0]["rl/kl"] == 0.0 and kl[1]["rl/kl"] > 0
    assert abs(kl[0]["rl/pg_loss"] - tp1["plain"][0]["rl/pg_loss"]) <= 1e-6 * abs(tp1["plain"][0]["rl/pg_loss"]) + 1e-12
    # the loss mask covers exactly the response tokens of each prompt+response row
    assert tp2["masked_labels"] == tp2["responses"]
    # the update follows the advantages: the token-summed surrogate sum A * dlogp rises (first order
    # for a small step), and responses with A > 0 gain log-probability relative to those with A < 0
    delta, adv = np.asarray(tp2["delta"]), np.asarray(tp2["advantages"])
    assert (adv > 0).any() and (adv < 0).any()
    assert float((adv * delta).sum()) > 0, (adv, delta)
    assert delta[adv > 0].mean() > delta[adv < 0].mean(), (adv, delta)
    ref = runs["tp1"]
    assert [r["step"] for r in ref] == [1, 2]
    for r in ref:  # both terms of the dual objective are live
        assert r["rl/ntp_loss"] > 0 and abs(r["rl/rl_loss"]) > 0 and r["grad_norm"] > 0
        assert r["rl/reward_std"] > 0
    for name in ("tp2", "pp2"):
        worst = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(ref, runs[name]))
        print(f"RL+NTP loss, {name} vs tp1, fixed rollouts: max relative difference {worst:.2e}")
        for a, b in zip(ref, runs[name]):
            for key in ("loss", "rl/rl_loss", "rl/ntp_loss"):
                assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]) + 1e-12, (name, a["step"], key, a[key], b[key])
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (name, a["grad_norm"], b["grad_norm"])
            assert a["rl/reward_mean"] == b["rl/reward_mean"]


def _real_rollouts_then_bad_input(overrides, bad_overrides, bad_dir):
    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.errors import UserError
    from megatron_midtrain.testing.runs import train_and_report, with_test_defaults
    from megatron_midtrain.training.trainer import Trainer

    message = None
    try:  # an entropy index of another dataset: refused before anything is written
        Trainer(load_config(with_test_defaults(bad_overrides)))
    except UserError as err:
        message = str(err)
    import torch.distributed as dist

    if dist.is_initialized():  # rank 0 holds the run lock (it creates the dir, then removes it on the
        dist.barrier()         # error): look only once every rank has finished its failed start
    bad_written = os.path.exists(bad_dir)
    return {"records": train_and_report(overrides).get("records"), "message": message, "bad_written": bad_written}


def test_rmt_loop_with_real_rollouts_at_dp2(tmp_path, entropy_dirs):
    dirs = f"method.entropy_dirs=[{entropy_dirs[0]},{entropy_dirs[1]}]"
    swapped = f"method.entropy_dirs=[{entropy_dirs[1]},{entropy_dirs[0]}]"
    overrides = RMT_TEST + [dirs, f"run.dir={tmp_path / 'run'}", "method.max_new_tokens_steps=[2]",
                            "method.max_new_tokens_values=[6]", "method.temperature=1.0"]
    bad = RMT_TEST + [swapped, f"run.dir={tmp_path / 'bad'}"]
    out = run_distributed(_real_rollouts_then_bad_input, 2, overrides, bad, str(tmp_path / "bad"))
    msg = out[0]["message"]
    assert msg and "\n" not in msg and "does not line up" in msg and "fix:" in msg
    assert not out[0]["bad_written"] and not out[1]["bad_written"]
    records = out[0]["records"]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for key in ("rl/reward_mean", "rl/reward_std", "rl/accuracy", "rl/response_len", "rl/budget", "rl/len_over_budget",
                    "rl/bucket_easy", "rl/bucket_medium", "rl/bucket_hard", "rl/clip_frac", "rl/kl",
                    "rl/gen_tokens_per_s", "rl/gen_time_s", "rl/train_time_s", "rl/gen_time_frac", "rl/ntp_loss", "rl/pg_loss"):
            assert key in r, key
        assert abs(r["rl/bucket_easy"] + r["rl/bucket_medium"] + r["rl/bucket_hard"] - 1.0) < 1e-9
        assert 0 < r["rl/response_len"] <= r["rl/max_new_tokens"]
        assert r["rl/gen_tokens_per_s"] > 0 and r["grad_norm"] > 0
    # budget B_t = max(1, floor(4 * 0.5^(t/T))) and the max-length schedule's step-up at step 2
    assert [r["rl/budget"] for r in records] == [4, 2]
    assert [r["rl/max_new_tokens"] for r in records] == [8, 6]
    # one update per rollout batch: on-policy, the old log-probs are the detached current ones
    # (no recompute), so the ratio and the clip are trivial by design; tests/test_grpo_minibatch.py
    # covers several updates, where they act
    assert all(r["rl/approx_kl_old"] == 0.0 for r in records)


def test_rmt_budget_demo_preset_has_a_falling_budget_and_multi_token_responses(tmp_path, entropy_dirs):
    """experiment=rmt_budget_demo: responses of several tokens that can end (EOD) and a budget
    that falls to budget_min at the end; a 3-step run at tiny sizes logs both (real rollouts)."""
    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.rl.budget import token_budget
    from megatron_midtrain.testing.runs import train_and_report

    m = load_config(["experiment=rmt_budget_demo"]).method
    T = load_config(["experiment=rmt_budget_demo"]).train.max_steps
    assert m.name == "rmt" and m.stop_at_eos and m.answer_format == "plain"
    assert m.max_new_tokens >= m.budget_b0 > m.budget_min > 1 and m.target_tokens >= m.budget_b0
    # the schedule the run logs (NextTokenTask.budget(step) = token_budget(step - 1, T, ...))
    budgets = [token_budget(s - 1, T, m.budget_b0, m.budget_gamma, m.budget_min) for s in range(1, T + 1)]
    assert budgets[0] == m.budget_b0 and budgets[-1] == m.budget_min and budgets == sorted(budgets, reverse=True)

    dirs = f"method.entropy_dirs=[{entropy_dirs[0]},{entropy_dirs[1]}]"
    # method=rmt first: with_test_defaults adds method=ntp unless an override names the method
    overrides = ["method=rmt", "experiment=rmt_budget_demo", dirs, f"run.dir={tmp_path / 'run'}", "train.max_steps=3",
                 "method.prompts_per_step=2", "method.group_size=4", "method.rollout_micro_batch_size=4",
                 "train.save_interval=0"]
    records = run_distributed(train_and_report, 1, overrides)[0]["records"]
    assert [r["step"] for r in records] == [1, 2, 3]
    b = [r["rl/budget"] for r in records]
    assert b[0] == m.budget_b0 and b[0] > b[1] > b[2], b  # 16, 8, 4 over T = 3
    for r in records:
        assert 1 < r["rl/response_len"] <= r["rl/max_new_tokens"] == m.max_new_tokens
        assert 0 <= r["rl/length_reward"] <= 1
