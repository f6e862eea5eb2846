"""The GRPO rollout step of ``method=rmt`` and ``method=grpo``.

One optimizer step, in the style of NeMo-Aligner / NeMo-RL but inside the training job:

1. **prompts**: RMT draws positions Φ_RL from the step's corpus samples (entropy curriculum)
   and turns each into a next-token reasoning prompt with the budget B_t; GRPO draws problems;
2. **rollouts**: G responses per prompt by KV-cache generation on the policy itself, under the
   training TP/PP layout (:func:`megatron_midtrain.rl.generation.generate`);
3. **rewards** and group-normalised **advantages**;
4. **old log-probs** recomputed by the forward-only pass (generation numerics differ from the
   training forward, so ratios start from the training numerics), and the KL reference's;
5. **update**: the schedule runs the corpus micro-batches (λ·NTP outside Φ_RL) and the rollout
   micro-batches (clipped GRPO loss) into the same gradient buffers; each loss is already
   divided by its global normaliser, so the gradients are summed over DP once at the end.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_midtrain.errors import UserError
from megatron_midtrain.losses.vocab_parallel import label_logprobs
from megatron_midtrain.rl.entropy import BUCKET_NAMES
from megatron_midtrain.rl.generation import SamplingParams, generate
from megatron_midtrain.rl.grpo import aggregation_units, grpo_advantages
from megatron_midtrain.rl.losses import GRPOLoss
from megatron_midtrain.rl.rewards import STATUS_CORRECT, STATUS_EMPTY, STATUS_MISSING
from megatron_midtrain.rl.rollout_batches import attach_ntp_inputs, attach_rollout_inputs, rollout_micro_batches
from megatron_midtrain.rl.tasks import NextTokenTask, Prompt, VerifiableTask, response_text, score_verifiable
from megatron_midtrain.training.forward import finalize_gradients, forward_only, method_loss_fn, reduce_reports, run_schedule
from megatron_midtrain.training.step import StepResult


def gather_dp(values: list) -> list:
    """Concatenate a per-rank Python list over the data-parallel group."""
    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) == 1:
        return list(values)
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, list(values), group=group)
    return [v for part in out for v in part]


class PolicyRollouts:
    """The rollout source: KV-cache sampling on the policy's own stage (any TP/PP).

    ``rollouts(step, prompt_rows, params, seed) -> GenerationResult``; a run can swap in another
    source with the same call as :attr:`RolloutStep.rollouts` (tests feed identical rollouts
    to every layout this way).
    """

    def __init__(self, model, tokenizer, max_batch_rows: int):
        self.model, self.tokenizer, self.max_batch_rows = model, tokenizer, max_batch_rows

    def __call__(self, step: int, prompt_rows: list[list[int]], params: SamplingParams, seed: int):  # noqa: ARG002
        return generate(self.model.module, prompt_rows, params, vocab_size=self.tokenizer.vocab_size, seed=seed,
                        detokenize=self.tokenizer.detokenize, max_batch_rows=self.max_batch_rows)


class RolloutStep:
    """``forward_backward(step)`` = prompts -> rollouts -> rewards -> advantages -> update (module docstring)."""

    def __init__(self, trainer, method):
        rl = trainer.cfg.method
        self.cfg, self.rl, self.method = trainer.cfg, rl, method
        self.model, self.device, self.layout = trainer.model, trainer.device, trainer.layout
        self.batches = trainer.train_batches
        self.tokenizer = trainer.data.tokenizer
        self.prompts_per_rank = rl.prompts_per_step // trainer.layout.dp
        self.task = NextTokenTask(trainer, rl.entropy_dirs) if rl.name == "rmt" else VerifiableTask(trainer)
        self.grpo_loss = GRPOLoss(rl)
        self.kl_reference = self._build_kl_reference(trainer) if rl.kl_beta > 0 else None
        self.eos_id = self.tokenizer.eod if rl.stop_at_eos else None
        self.generator = PolicyRollouts(trainer.model, self.tokenizer, rl.generation_batch_rows)
        #: Where the step's rollouts come from (the policy's own sampling unless replaced).
        self.rollouts = self.generator
        self._timing: dict = {}

    def _build_kl_reference(self, trainer):
        if not self.cfg.reference.checkpoint:
            raise UserError(f"method.kl_beta={self.rl.kl_beta} needs a reference model", "set reference.checkpoint=PATH or method.kl_beta=0")
        from megatron_midtrain.model.builder import have_transformer_engine
        from megatron_midtrain.reference.colocated import ColocatedReference

        return ColocatedReference(self.cfg, trainer.tokenizer_id, trainer.dtype, have_transformer_engine())

    def sampling(self, step: int, greedy: bool = False) -> SamplingParams:
        rl = self.rl
        return SamplingParams(
            max_new_tokens=rl.max_new_tokens_at(step), temperature=rl.temperature, top_p=rl.top_p,
            greedy=greedy or rl.temperature == 0, eos_id=self.eos_id, stop_strings=tuple(rl.stop_strings),
        )

    def rollout_logprobs(self, model, batches: list[dict]) -> list:
        """Label log-probs of each rollout micro-batch under ``model`` (last stage; None elsewhere)."""
        return forward_only(model, batches, len(batches), label_logprobs, seq_length=batches[0]["tokens"].shape[1],
                            micro_batch_size=self.rl.rollout_micro_batch_size, device=self.device)

    def _schedule(self, batches: list[dict], loss, seq_length: int, micro_batch_size: int) -> dict:
        loss_fn = method_loss_fn(loss, parallel_state.get_tensor_model_parallel_group())
        reports = run_schedule(self.model, batches, len(batches), loss_fn, seq_length=seq_length,
                               micro_batch_size=micro_batch_size, device=self.device)
        return loss.finalize_report(reduce_reports(reports, self.layout.dp, self.layout.pp))

    # ------------------------------------------------------------------ one step
    def forward_backward(self, step: int) -> StepResult:
        rl, G = self.rl, self.rl.group_size
        start = time.perf_counter()
        dp_rank = parallel_state.get_data_parallel_rank()
        metrics: dict = {}

        # 1. prompts
        corpus = None
        if isinstance(self.task, NextTokenTask):
            corpus = list(self.batches.iterator(step - 1))
            prompts, rl_masks, counts = self.task.prompts(step, corpus, self.prompts_per_rank, dp_rank)
            counts = np.asarray(gather_dp([counts.tolist()])).sum(axis=0)
            for name, c in zip(BUCKET_NAMES, counts):
                metrics[f"rl/bucket_{name}"] = float(c / max(1, counts.sum()))
            metrics["rl/budget"] = self.task.budget(step)
        else:
            prompts = self.task.prompts(step, self.prompts_per_rank, dp_rank, self.layout.dp)
        if not prompts:
            raise UserError(f"step {step}: no position could be selected for RL", "check the data and method.min_context_tokens")

        # 2. rollouts (G per prompt, groups contiguous)
        params = self.sampling(step)
        prompt_rows = [p.ids for p in prompts for _ in range(G)]
        gen = self.rollouts(step, prompt_rows, params, seed=(self.cfg.run.seed * 1_000_003 + step) * 1009 + dp_rank)

        # 3. rewards and advantages
        rewards, statuses, lengths, len_rewards = [], [], [], []
        for i, resp in enumerate(gen.responses):
            text = response_text(self.tokenizer, resp, self.eos_id, rl.stop_strings)
            r, acc, r_len = self.task.score(text, len(resp), prompts[i // G])
            rewards.append(r)
            statuses.append(acc.status)
            lengths.append(len(resp))
            len_rewards.append(r_len)
        advantages = grpo_advantages(torch.tensor(rewards, dtype=torch.float64), G, no_std=rl.no_std)

        # 4. rollout micro-batches, old (and reference) log-probs
        train_start = time.perf_counter()
        batches = rollout_micro_batches(prompts, gen.responses, advantages, G, rl.rollout_micro_batch_size, self.tokenizer.eod)
        rollout_len = batches[0]["tokens"].shape[1]
        old = self.rollout_logprobs(self.model, batches)
        ref = self.rollout_logprobs(self.kl_reference.model, batches) if self.kl_reference is not None else [None] * len(batches)

        # global normalisers: GRPO aggregation units and the NTP token count
        local = torch.tensor([float(sum(aggregation_units(b["loss_mask"], rl.loss_agg) for b in batches)), 0.0, float(len(gen.responses))],
                             dtype=torch.float64)
        if corpus is not None:
            local[1] = float(sum(((b["loss_mask"] > 0) & ~m).sum() for b, m in zip(corpus, rl_masks)))
        if self.layout.dp > 1:
            local = local.to(self.device)
            dist.all_reduce(local, group=parallel_state.get_data_parallel_group())
            local = local.cpu()
        agg_norm, ntp_norm = max(local[0].item(), 1.0), max(local[1].item(), 1.0)
        attach_rollout_inputs(batches, old, ref, agg_norm, float(rl.max_new_tokens_at(step)))

        # 5. update: corpus NTP term + GRPO term into the same gradient buffers, one DP reduction
        report = {}
        if corpus is not None and self.method.ntp_weight > 0:
            attach_ntp_inputs(corpus, rl_masks, ntp_norm)
            ntp = self._schedule(corpus, self.method, self.cfg.data.seq_length, self.cfg.train.micro_batch_size)
            report.update({k: v for k, v in ntp.items() if k != "loss"})
        grpo = self._schedule(batches, self.grpo_loss, rollout_len, rl.rollout_micro_batch_size)
        report.update({k: v for k, v in grpo.items() if k != "loss"})
        finalize_gradients(self.model, None)  # DP sum: the losses are globally normalised
        loss = report.get("rl/rl_loss", float("nan")) + self.method.ntp_weight * report.get("rl/ntp_loss", 0.0)
        self._timing = {"start": start, "train_start": train_start}

        # rollout statistics over every DP rank
        all_r = np.asarray(gather_dp(rewards), dtype=np.float64)
        all_s = gather_dp(statuses)
        all_len = np.asarray(gather_dp(lengths), dtype=np.float64)
        all_lr = np.asarray(gather_dp(len_rewards), dtype=np.float64)
        gen_tokens = float(sum(gather_dp([gen.generated_tokens])))
        gen_time_all = max(gather_dp([gen.seconds]))
        metrics.update({
            "rl/reward_mean": float(all_r.mean()),
            "rl/reward_std": float(all_r.std()),
            "rl/accuracy": float(np.mean([s == STATUS_CORRECT for s in all_s])),
            "rl/format_error": float(np.mean([s in (STATUS_MISSING, STATUS_EMPTY) for s in all_s])),
            "rl/response_len": float(all_len.mean()),
            "rl/length_reward": float(all_lr.mean()),
            "rl/max_new_tokens": params.max_new_tokens,
            "rl/gen_tokens_per_s": gen_tokens / max(gen_time_all, 1e-9),
            "rl/gen_time_s": gen_time_all,
            "rl/rollout_len": rollout_len,
        })
        if "rl/budget" in metrics:
            metrics["rl/len_over_budget"] = float(all_len.mean() / metrics["rl/budget"])
        metrics.update(report)
        return StepResult(loss=loss, metrics=metrics, tokens=gen_tokens + local[2].item() * rollout_len)

    def finish_record(self, record: dict) -> None:
        """Training time of the step (old log-probs to optimizer step) and generation's share."""
        now = time.perf_counter()
        record["rl/train_time_s"] = now - self._timing["train_start"]
        record["rl/gen_time_frac"] = record["rl/gen_time_s"] / max(now - self._timing["start"], 1e-9)

    # ------------------------------------------------------------------ verifiable-task evaluation
    def heldout_accuracy(self) -> float:
        """Greedy exact-match accuracy on the held-out problems (split over DP ranks). Collective."""
        problems = self.task.held_out
        dp, dp_rank = self.layout.dp, parallel_state.get_data_parallel_rank()
        mine = problems[dp_rank::dp]
        correct = 0
        if mine:
            prompts = [Prompt(ids=self.tokenizer.tokenize(p["prompt"]), answer=p["answer"]) for p in mine]
            params = self.sampling(self.cfg.train.max_steps, greedy=True)
            gen = self.generator(self.cfg.train.max_steps, [p.ids for p in prompts], params, seed=0)
            for p, resp in zip(prompts, gen.responses):
                text = response_text(self.tokenizer, resp, self.eos_id, self.rl.stop_strings)
                correct += score_verifiable(text, p, self.rl).status == STATUS_CORRECT
        total = sum(gather_dp([correct]))
        return total / max(1, len(problems))
