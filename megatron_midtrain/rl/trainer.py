"""The GRPO rollout loop on megatron-core (``method=rmt`` and ``method=grpo``).

One optimizer step, in the style of NeMo-Aligner / NeMo-RL but inside the training job:

1. **prompts**: RMT draws positions Φ_RL from the step's corpus samples (entropy curriculum)
   and turns each into a next-token reasoning prompt with the budget B_t; GRPO draws problems;
2. **rollouts**: G responses per prompt by KV-cache generation on the policy itself, under the
   training TP/PP layout (:func:`megatron_midtrain.rl.generation.generate`);
3. **rewards** and group-normalised **advantages**;
4. **old log-probs** recomputed by a forward-only pass of megatron's schedule (generation
   numerics differ from the training forward, so ratios start from the training numerics);
5. **update**: the schedule runs the corpus micro-batches (λ·NTP outside Φ_RL) and the rollout
   micro-batches (clipped GRPO loss) into the same gradient buffers; each loss is already
   divided by its global normaliser, so gradients are summed over DP once at the end
   (``finalize_model_grads`` with no token division) and the optimizer steps.

Rollout micro-batches of one step are right-padded to one length (megatron's pipeline
exchanges fixed-shape activations); padding is outside every mask.
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads

from megatron_midtrain.errors import UserError
from megatron_midtrain.rl.entropy import BUCKET_NAMES
from megatron_midtrain.rl.generation import SamplingParams, generate
from megatron_midtrain.rl.grpo import aggregation_units, grpo_advantages
from megatron_midtrain.rl.method import GRPOLoss, LogprobCollector
from megatron_midtrain.rl.tasks import NextTokenTask, VerifiableTask, response_text
from megatron_midtrain.rl.rewards import STATUS_CORRECT, STATUS_EMPTY, STATUS_MISSING
from megatron_midtrain.training.trainer import Trainer, log0


class _MicroBatches(list):
    """A list of micro-batch dicts with their size (megatron's schedule needs it for PP shapes)."""

    def __init__(self, items, micro_batch_size: int):
        super().__init__(items)
        self.micro_batch_size = micro_batch_size

    def iterator(self) -> "_SizedIterator":
        return _SizedIterator(self)


class _SizedIterator:
    """``iter(batches)`` that still knows the micro-batch size."""

    def __init__(self, batches: _MicroBatches):
        self._it = iter(batches)
        self.micro_batch_size = batches.micro_batch_size

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)


def _gather_dp(values: list) -> list:
    """Concatenate a per-rank Python list over the data-parallel group."""
    group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(group) == 1:
        return list(values)
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, list(values), group=group)
    return [v for part in out for v in part]


def rollout_micro_batches(prompts, responses, advantages, group_size: int, micro_batch_size: int, pad_id: int,
                          multiple: int = 8) -> _MicroBatches:
    """Prompt+response rows (row ``i`` is rollout ``i % G`` of prompt ``i // G``), right-padded.

    ``labels[t] = seq[t+1]``; the loss mask covers the labels that are response tokens.
    """
    rows = [list(prompts[i // group_size].ids) + list(r) for i, r in enumerate(responses)]
    longest = max(len(r) for r in rows) - 1
    length = max(multiple, -(-longest // multiple) * multiple)
    n = len(rows)
    seq = torch.full((n, length + 1), pad_id, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.float32)
    for i, row in enumerate(rows):
        seq[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        p = len(prompts[i // group_size].ids)
        mask[i, p - 1: len(row) - 1] = 1.0
    adv = torch.as_tensor(advantages, dtype=torch.float32)
    batches = []
    for s in range(0, n, micro_batch_size):
        e = s + micro_batch_size
        batches.append({
            "tokens": seq[s:e, :-1].contiguous(),
            "labels": seq[s:e, 1:].contiguous(),
            "loss_mask": mask[s:e],
            "position_ids": torch.arange(length).unsqueeze(0).expand(e - s, -1).contiguous(),
            "advantages": adv[s:e],
        })
    return _MicroBatches(batches, micro_batch_size)


def attach_rollout_inputs(batches: list[dict], old: list, ref: list, agg_normalizer: float, drgrpo_constant: float) -> None:
    """Add what :class:`GRPOLoss` reads to each rollout micro-batch: the old (and reference)
    log-probs of the last stage, the global aggregation normaliser and Dr.GRPO's constant."""
    for b, o, r in zip(batches, old, ref):
        b["old_logprobs"] = o if o is not None else torch.zeros_like(b["loss_mask"])
        if r is not None:
            b["ref_logprobs"] = r
        b["agg_normalizer"] = torch.tensor(agg_normalizer, dtype=torch.float64)
        b["drgrpo_constant"] = drgrpo_constant


def attach_ntp_inputs(corpus: list[dict], rl_masks: list, ntp_normalizer: float) -> None:
    """Add Φ_RL and the global NTP token count to each corpus micro-batch (RMT's NTP term)."""
    for b, m in zip(corpus, rl_masks):
        b["rl_mask"] = m
        b["ntp_normalizer"] = torch.tensor(ntp_normalizer, dtype=torch.float64)


class RLTrainer(Trainer):
    """:class:`Trainer` whose step is a GRPO rollout step (see the module docstring)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        rl = cfg.method
        self.rl = rl
        self.tokenizer = self.data.tokenizer
        if rl.name == "rmt":
            self.task = NextTokenTask(self, rl.entropy_dirs)
        else:
            self.task = VerifiableTask(self)
        self.grpo_loss = GRPOLoss(rl)
        self.collector = LogprobCollector()
        self.kl_reference = self._build_kl_reference() if rl.kl_beta > 0 else None
        self.eos_id = self.tokenizer.eod if rl.stop_at_eos else None
        #: Test hook: ``fn(step, prompt_rows) -> GenerationResult`` replaces generation, so that
        #: a test can feed identical rollouts to runs under different layouts.
        self.fixed_responses = None

    def _check_method_inputs(self, sources) -> None:
        """Layout and side-data checks, before the run directory is written."""
        from megatron_midtrain.rl.entropy import check_entropy_alignment
        from megatron_midtrain.rl.tasks import read_problems

        rl, dp = self.cfg.method, self.layout.dp
        if rl.prompts_per_step % dp:
            raise UserError(f"method.prompts_per_step={rl.prompts_per_step} is not divisible by DP={dp}",
                            "use a multiple of the data-parallel size")
        self.prompts_per_rank = rl.prompts_per_step // dp
        rows = self.prompts_per_rank * rl.group_size
        if rows % rl.rollout_micro_batch_size:
            raise UserError(f"{rows} rollouts per DP rank (prompts_per_step/DP x group_size) are not divisible by "
                            f"method.rollout_micro_batch_size={rl.rollout_micro_batch_size}", "pick a divisor")
        if rl.name == "rmt":
            _, prefixes, _ = sources
            if len(rl.entropy_dirs) != len(prefixes):
                raise UserError(f"method.entropy_dirs has {len(rl.entropy_dirs)} entries for {len(prefixes)} datasets",
                                "give one entropy index (tools/preprocess_entropy.py --output DIR) per data path, in order")
            for d, prefix in zip(rl.entropy_dirs, prefixes):
                check_entropy_alignment(d, prefix, self.tokenizer_id)
        else:
            for path, what in ((rl.task_file, "method.task_file"), (rl.eval_file, "method.eval_file")):
                if path:
                    read_problems(path, what)

    def _build_kl_reference(self):
        if not self.cfg.reference.checkpoint:
            raise UserError(f"method.kl_beta={self.rl.kl_beta} needs a reference model", "set reference.checkpoint=PATH or method.kl_beta=0")
        from megatron_midtrain.reference.colocated import ColocatedReference
        from megatron_midtrain.model.builder import have_transformer_engine

        return ColocatedReference(self.cfg, self.tokenizer_id, self.dtype, have_transformer_engine())

    # ------------------------------------------------------------------ rollouts
    def sampling(self, step: int, greedy: bool = False) -> SamplingParams:
        rl = self.rl
        return SamplingParams(
            max_new_tokens=rl.max_new_tokens_at(step), temperature=rl.temperature, top_p=rl.top_p,
            greedy=greedy or rl.temperature == 0, eos_id=self.eos_id, stop_strings=tuple(rl.stop_strings),
        )

    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams, seed: int):
        return generate(self.model.module, prompt_ids, params, vocab_size=self.tokenizer.vocab_size, seed=seed,
                        detokenize=self.tokenizer.detokenize, max_batch_rows=self.rl.generation_batch_rows)

    def _logprobs(self, model_schedule, batches: _MicroBatches) -> list:
        """Per-micro-batch label log-probs (last stage; ``None`` elsewhere), forward-only."""
        reports = model_schedule(batches.iterator(), len(batches), True, self.collector, seq_length=batches[0]["tokens"].shape[1])
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return [r["logprobs"] for r in reports]
        return [None] * len(batches)

    def _reference_logprobs(self, batches: _MicroBatches) -> list:
        with torch.no_grad():
            return self._logprobs(partial(self._schedule, model=self.kl_reference.model), batches)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        rl = self.rl
        step = self.step + 1
        self._inject_nonfinite = step in set(self.cfg.train.inject_nonfinite_at)
        start = time.perf_counter()
        dp_rank = parallel_state.get_data_parallel_rank()
        record: dict = {}

        # 1. prompts
        corpus = None
        if isinstance(self.task, NextTokenTask):
            corpus = list(self.train_batches.iterator(step - 1))
            prompts, rl_masks, counts = self.task.prompts(step, corpus, self.prompts_per_rank, dp_rank)
            counts = np.asarray(_gather_dp([counts.tolist()])).sum(axis=0)
            for name, c in zip(BUCKET_NAMES, counts):
                record[f"rl/bucket_{name}"] = float(c / max(1, counts.sum()))
            record["rl/budget"] = self.task.budget(step)
        else:
            prompts = self.task.prompts(step, self.prompts_per_rank, dp_rank, self.layout.dp)
        if not prompts:
            raise UserError(f"step {step}: no position could be selected for RL", "check the data and method.min_context_tokens")

        # 2. rollouts (G per prompt, groups contiguous)
        G = rl.group_size
        params = self.sampling(step)
        prompt_rows = [p.ids for p in prompts for _ in range(G)]
        if self.fixed_responses is not None:  # tests: the same rollouts under every layout
            gen = self.fixed_responses(step, prompt_rows)
        else:
            gen = self._generate(prompt_rows, params, seed=(self.cfg.run.seed * 1_000_003 + step) * 1009 + dp_rank)
        gen_time = gen.seconds

        # 3. rewards and advantages
        rewards, statuses, lengths, len_rewards = [], [], [], []
        for i, resp in enumerate(gen.responses):
            prompt = prompts[i // G]
            text = response_text(self.tokenizer, resp, self.eos_id, rl.stop_strings)
            r, acc, r_len = self.task.score(text, len(resp), prompt)
            rewards.append(r)
            statuses.append(acc.status)
            lengths.append(len(resp))
            len_rewards.append(r_len)
        advantages = grpo_advantages(torch.tensor(rewards, dtype=torch.float64), G, no_std=rl.no_std)

        # 4. rollout micro-batches, old (and reference) log-probs
        train_start = time.perf_counter()
        batches = rollout_micro_batches(prompts, gen.responses, advantages, G, rl.rollout_micro_batch_size, self.tokenizer.eod)
        rollout_len = batches[0]["tokens"].shape[1]
        with torch.no_grad():
            old = self._logprobs(self._schedule, batches)
        ref = self._reference_logprobs(batches) if self.kl_reference is not None else [None] * len(batches)

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

        # 5. update: corpus NTP term + GRPO term into the same gradient buffers
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        finalize = self.transformer_config.finalize_model_grads_func
        self.transformer_config.finalize_model_grads_func = None
        try:
            report = {}
            if corpus is not None and self.method.ntp_weight > 0:
                attach_ntp_inputs(corpus, rl_masks, ntp_norm)
                reports = self._schedule(iter(corpus), len(corpus), False, self.method)
                report.update({k: v for k, v in self._reduce_reports(reports, self.method).items() if k != "loss"})
            reports = self._schedule(batches.iterator(), len(batches), False, self.grpo_loss, seq_length=rollout_len)
            report.update({k: v for k, v in self._reduce_reports(reports, self.grpo_loss).items() if k != "loss"})
        finally:
            self.transformer_config.finalize_model_grads_func = finalize
        finalize_model_grads([self.model], num_tokens=None)  # DP sum: the losses are globally normalised

        loss = report.get("rl/rl_loss", float("nan")) + self.method.ntp_weight * report.get("rl/ntp_loss", 0.0)
        if self._inject_nonfinite:
            loss = float("nan")
        skipped, grad_norm = self._optimizer_step(step, loss)
        now = time.perf_counter()
        train_time = now - train_start

        # metrics (rollout statistics over every DP rank)
        all_r = np.asarray(_gather_dp(rewards), dtype=np.float64)
        all_s = _gather_dp(statuses)
        all_len = np.asarray(_gather_dp(lengths), dtype=np.float64)
        all_lr = np.asarray(_gather_dp(len_rewards), dtype=np.float64)
        gen_tokens = float(sum(_gather_dp([gen.generated_tokens])))
        gen_time_all = max(_gather_dp([gen_time]))
        record.update({
            "step": step,
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "consumed_tokens": step * self.cfg.train.global_batch_tokens,
            "step_time_s": now - start,
            "tokens_per_s": (gen_tokens + local[2].item() * rollout_len) / (now - start),
            "rl/reward_mean": float(all_r.mean()),
            "rl/reward_std": float(all_r.std()),
            "rl/accuracy": float(np.mean([s == STATUS_CORRECT for s in all_s])),
            "rl/format_error": float(np.mean([s in (STATUS_MISSING, STATUS_EMPTY) for s in all_s])),
            "rl/response_len": float(all_len.mean()),
            "rl/length_reward": float(all_lr.mean()),
            "rl/max_new_tokens": params.max_new_tokens,
            "rl/gen_tokens_per_s": gen_tokens / max(gen_time_all, 1e-9),
            "rl/gen_time_s": gen_time_all,
            "rl/train_time_s": train_time,
            "rl/gen_time_frac": gen_time_all / max(now - start, 1e-9),
            "rl/rollout_len": rollout_len,
        })
        if "rl/budget" in record:
            record["rl/len_over_budget"] = float(all_len.mean() / record["rl/budget"])
        record.update(report)
        if skipped:
            record["skipped"] = True
        if step == 1 and hasattr(self, "_initial_accuracy"):
            record["rl/heldout_accuracy_before"] = self._initial_accuracy
        if isinstance(self.task, VerifiableTask) and self._accuracy_due(step):
            record["rl/heldout_accuracy"] = self.heldout_accuracy()
        return record

    # ------------------------------------------------------------------ verifiable-task evaluation
    def _accuracy_due(self, step: int) -> bool:
        interval = self.cfg.train.eval_interval
        return self.rl.eval_problems > 0 and (step == self.cfg.train.max_steps or (interval and step % interval == 0))

    def heldout_accuracy(self) -> float:
        """Greedy exact-match accuracy on the held-out problems (split over DP ranks)."""
        from megatron_midtrain.rl.tasks import Prompt, score_verifiable

        problems = self.task.held_out
        dp, dp_rank = self.layout.dp, parallel_state.get_data_parallel_rank()
        mine = problems[dp_rank::dp]
        correct = 0
        if mine:
            prompts = [Prompt(ids=self.tokenizer.tokenize(p["prompt"]), answer=p["answer"]) for p in mine]
            gen = self._generate([p.ids for p in prompts], self.sampling(self.cfg.train.max_steps, greedy=True), seed=0)
            for p, resp in zip(prompts, gen.responses):
                text = response_text(self.tokenizer, resp, self.eos_id, self.rl.stop_strings)
                correct += score_verifiable(text, p, self.rl).status == STATUS_CORRECT
        total = sum(_gather_dp([correct]))
        return total / max(1, len(problems))

    def train(self) -> None:
        if isinstance(self.task, VerifiableTask) and self.rl.eval_problems > 0 and self.step == 0:
            acc = self.heldout_accuracy()
            log0(f"held-out accuracy before GRPO: {acc:.3f} ({len(self.task.held_out)} problems, greedy)")
            self._initial_accuracy = acc
        super().train()
