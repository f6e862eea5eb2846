"""The GRPO rollout step of ``method=rmt`` and ``method=grpo``.

One optimizer step, in the style of NeMo-Aligner / NeMo-RL but inside the training job:

1. **prompts**: RMT draws positions Φ_RL from the step's corpus samples (entropy curriculum)
   and turns each into a next-token reasoning prompt with the budget B_t; GRPO draws problems;
2. **rollouts**: G responses per prompt by KV-cache generation on the policy itself, under the
   training TP/PP layout (:func:`megatron_midtrain.rl.generation.generate`);
3. **rewards** and group-normalised **advantages**;
4. **old log-probs** recorded by the forward-only pass when there are several updates
   (generation numerics differ from the training forward, so ratios start from the training
   numerics), and the KL reference's;
5. **updates**: ``ppo_epochs`` passes over ``ppo_mini_batches`` contiguous mini-batches of the
   rollout batch (and of RMT's corpus micro-batches), one optimizer step each (verl's
   ``ppo_mini_batch_size``/``ppo_epochs``): the schedule runs the corpus micro-batches
   (λ·NTP outside Φ_RL) and the rollout micro-batches (clipped GRPO loss) into the same gradient
   buffers; each loss is already divided by its mini-batch's global normaliser, so the gradients
   are summed over DP once per update. With a single update the old log-probs are the detached
   current ones (ratio 1, no recompute); with more they are recorded before the first update,
   so later mini-batches see ratios ≠ 1 and the clip acts.
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


#: Statistics whose per-update values are also logged (``rl/u<k>/<name>``) with several updates.
PER_UPDATE = ("rl/ratio_mean", "rl/clip_frac", "rl/clip_frac_low", "rl/clip_frac_high", "rl/approx_kl_old")


def _mean_reports(reports: list[dict]) -> dict:
    """The mean of each statistic over a step's updates; with several, also each update's own values."""
    if len(reports) == 1:
        return reports[0]
    out = {key: sum(r[key] for r in reports) / len(reports) for key in reports[0]}
    for i, r in enumerate(reports, 1):
        out.update({f"rl/u{i}/{key[3:]}": r[key] for key in PER_UPDATE if key in r})
    return out


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
        self.zero_grad, self.optimizer_step = trainer.zero_grad, trainer.optimizer_step
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
            text = response_text(self.tokenizer, resp, self.eos_id, rl.stop_strings, after=prompts[i // G].ids[-1:])
            r, acc, r_len = self.task.score(text, len(resp), prompts[i // G])
            rewards.append(r)
            statuses.append(acc.status)
            lengths.append(len(resp))
            len_rewards.append(r_len)
        advantages = grpo_advantages(torch.tensor(rewards, dtype=torch.float64), G, no_std=rl.no_std)

        # 4. mini-batches of rollout micro-batches, old (and reference) log-probs
        train_start = time.perf_counter()
        K = rl.ppo_mini_batches
        # Mini-batch k holds the prompts i with i = k (mod K), each with its G rollouts: as every DP
        # rank holds a contiguous block of P prompts (P a multiple of K), that is the same split of
        # the global batch at any DP size, so the updates do not depend on the layout.
        parts = []
        for k in range(K):
            idx = list(range(k, len(prompts), K))
            parts.append(rollout_micro_batches([prompts[i] for i in idx], [gen.responses[i * G + j] for i in idx for j in range(G)],
                                               advantages.reshape(-1, G)[idx].reshape(-1), G, rl.rollout_micro_batch_size,
                                               self.tokenizer.eod))
        rollout_len = max(part[0]["tokens"].shape[1] for part in parts)
        # One update: on-policy, the ratio is 1 by construction, so nothing is recomputed (the
        # loss uses the detached current log-probs). More: the rollout policy's log-probs are
        # recorded once, before the first update changes the weights.
        old = [self.rollout_logprobs(self.model, part) if rl.updates_per_step > 1 else [None] * len(part) for part in parts]
        ref = [self.rollout_logprobs(self.kl_reference.model, part) if self.kl_reference is not None else [None] * len(part)
               for part in parts]
        corpus_parts = ([list(zip(corpus, rl_masks))[k::K] for k in range(K)] if corpus is not None else [None] * K)

        # global normalisers of each mini-batch (GRPO aggregation units, NTP token count) and the
        # rollout tokens trained on (throughput), one all-reduce for all
        local = torch.zeros(2 * K + 1, dtype=torch.float64)
        for k, part in enumerate(parts):
            local[k] = float(sum(aggregation_units(b["loss_mask"], rl.loss_agg) for b in part))
            if corpus_parts[k] is not None:
                local[K + k] = float(sum(((b["loss_mask"] > 0) & ~m).sum() for b, m in corpus_parts[k]))
        local[2 * K] = float(sum(b["tokens"].numel() for part in parts for b in part))  # rollout tokens trained on
        if self.layout.dp > 1:
            local = local.to(self.device)
            dist.all_reduce(local, group=parallel_state.get_data_parallel_group())
            local = local.cpu()
        for k, part in enumerate(parts):
            attach_rollout_inputs(part, old[k], ref[k], max(local[k].item(), 1.0), float(rl.max_new_tokens_at(step)))
            if corpus_parts[k] is not None:
                attach_ntp_inputs([b for b, _ in corpus_parts[k]], [m for _, m in corpus_parts[k]], max(local[K + k].item(), 1.0))

        # 5. updates: ppo_epochs passes over the K mini-batches, one optimizer step each; in each,
        # the corpus NTP term and the GRPO term go into the same gradient buffers, one DP reduction
        losses, updates, reports = [], [], []
        for epoch in range(rl.ppo_epochs):
            for k, part in enumerate(parts):
                if epoch or k:
                    self.zero_grad()
                report = {}
                if corpus_parts[k] is not None and self.method.ntp_weight > 0:
                    ntp = self._schedule([b for b, _ in corpus_parts[k]], self.method, self.cfg.data.seq_length,
                                         self.cfg.train.micro_batch_size)
                    report.update({key: v for key, v in ntp.items() if key != "loss"})
                grpo = self._schedule(part, self.grpo_loss, part[0]["tokens"].shape[1], rl.rollout_micro_batch_size)
                report.update({key: v for key, v in grpo.items() if key != "loss"})
                finalize_gradients(self.model, None)  # DP sum: the losses are globally normalised
                loss = report.get("rl/rl_loss", float("nan")) + self.method.ntp_weight * report.get("rl/ntp_loss", 0.0)
                updates.append(self.optimizer_step(loss))
                losses.append(loss)
                reports.append(report)
        report = _mean_reports(reports)
        loss = sum(losses) / len(losses)
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
        return StepResult(loss=loss, metrics=metrics, tokens=gen_tokens + local[2 * K].item(), updates=updates)

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
                text = response_text(self.tokenizer, resp, self.eos_id, self.rl.stop_strings, after=p.ids[-1:])
                correct += score_verifiable(text, p, self.rl).status == STATUS_CORRECT
        total = sum(gather_dp([correct]))
        return total / max(1, len(problems))
