"""Where RL prompts come from and how their responses are scored.

* :class:`NextTokenTask` (``method=rmt``): positions Φ_RL drawn from the entropy buckets of
  the step's corpus samples with the curriculum probabilities; each becomes a next-token
  reasoning prompt with the current token budget; reward = RPT prefix match (+) length reward.
* :class:`VerifiableTask` (``method=grpo``): problems with known answers (the demo's
  arithmetic by default); reward = exact match on the final answer.

Every rank of a model-parallel group builds the same prompts (same data, same seeds);
data-parallel ranks build disjoint ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_midtrain.errors import UserError
from megatron_midtrain.rl import rewards as rw
from megatron_midtrain.rl.answers import GSM8K_MARKER, reference_answer
from megatron_midtrain.rl.budget import token_budget
from megatron_midtrain.rl.curriculum import curriculum_probs, sample_positions
from megatron_midtrain.rl.prompts import build_prompt


@dataclass
class Prompt:
    """One RL prompt (its G rollouts share it)."""

    ids: list[int]
    budget: int | None = None
    target_bytes: list[bytes] | None = None  # next-token task: ground-truth continuation, per token
    answer: str | None = None  # verifiable task
    bucket: int | None = None
    meta: dict = field(default_factory=dict)


def continuation_bytes(tokenizer, context_ids: list[int], target_ids: list[int]) -> list[bytes]:
    """UTF-8 bytes of each target token as it reads after the context.

    Decoding differences (``decode(anchor + t[:k+1]) - decode(anchor + t[:k])``) rather than
    per-token pieces: tokenizers drop or merge the word-separating space when a token is decoded
    alone (SentencePiece's "▁"), but not after an anchor token.
    """
    anchor = list(context_ids[-1:])
    prev = tokenizer.detokenize(anchor).encode("utf-8")
    out = []
    for k in range(len(target_ids)):
        cur = tokenizer.detokenize(anchor + list(target_ids[: k + 1])).encode("utf-8")
        out.append(cur[len(prev):] if cur.startswith(prev) else tokenizer.detokenize([target_ids[k]]).encode("utf-8"))
        prev = cur
    return out


def response_text(tokenizer, response: list[int], eos_id: int | None, stop_strings, after: list[int] = ()) -> str:
    """The response's text without a final EOS and cut at the first stop string.

    ``after``: the prompt's last token(s). The text is then the response as it reads after them
    (``decode(after + response) - decode(after)``), as :func:`continuation_bytes` decodes the
    ground truth: a SentencePiece tokenizer drops the word-separating space of a response's first
    token when it is decoded alone, and ``answer_format=plain`` compares those bytes as they are.
    """
    ids = list(response[:-1] if response and eos_id is not None and response[-1] == eos_id else response)
    anchor = tokenizer.detokenize(list(after)) if after and ids else None
    joined = tokenizer.detokenize(list(after) + ids) if anchor is not None else None
    text = joined[len(anchor):] if joined is not None and joined.startswith(anchor) else tokenizer.detokenize(ids)
    for stop in stop_strings:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


def score_next_token(text: str, prompt: Prompt, cfg) -> rw.RewardResult:
    """RPT prefix-match correctness of one response (``plain``: the whole response is the prediction)."""
    return rw.score_prefix_match(text, prompt.target_bytes, cfg.answer_format, cfg.missing_penalty, cfg.empty_penalty,
                                 answer_regex=cfg.answer_regex)


def score_verifiable(text: str, prompt: Prompt, cfg) -> rw.RewardResult:
    """Exact match of one response's final answer (``cfg.answer_format``, ``answer_regex``,
    ``answer_normalize``) against the problem's reference; a GSM8K-style reference ("... #### 72")
    counts by the text after its last ``####``."""
    return rw.score_exact_match(text, prompt.answer, cfg.answer_format, cfg.missing_penalty, cfg.empty_penalty,
                                answer_regex=cfg.answer_regex, normalize=cfg.answer_normalize)


def rl_masks_from_positions(shape: tuple[int, int], rows, cols, micro_batch_size: int) -> list[torch.Tensor]:
    """Φ_RL as one boolean ``[mbs, seq]`` mask per micro-batch (CPU) from the chosen (row, position) pairs."""
    rl_mask = np.zeros(shape, dtype=bool)
    rl_mask[rows, cols] = True
    return [torch.from_numpy(rl_mask[i: i + micro_batch_size]) for i in range(0, shape[0], micro_batch_size)]


class NextTokenTask:
    """RMT: curriculum-sampled high-entropy positions of the step's corpus samples."""

    uses_corpus = True

    def __init__(self, trainer, entropy_dirs: list[str]):
        from megatron_midtrain.rl.sample_entropy import SampleEntropy

        self.cfg = trainer.cfg.method
        self.total_steps = trainer.cfg.train.max_steps
        self.tokenizer = trainer.data.tokenizer
        self.eod = self.tokenizer.eod
        self.seed = trainer.cfg.run.seed
        if not entropy_dirs:
            raise UserError("method=rmt needs an entropy index per dataset",
                            "build them with tools/preprocess_entropy.py and set method.entropy_dirs=[DIR,...]")
        self.entropy = SampleEntropy(trainer.data.train, trainer.data.prefixes, list(entropy_dirs), trainer.tokenizer_id)

    def budget(self, step: int) -> int:
        c = self.cfg
        return token_budget(step - 1, self.total_steps, c.budget_b0, c.budget_gamma, c.budget_min)

    def probs(self, step: int) -> np.ndarray:
        return curriculum_probs(step - 1, self.total_steps, self.cfg.curriculum, self.cfg.t1, self.cfg.t2)

    def prompts(self, step: int, batches: list[dict], num: int, dp_rank: int) -> tuple[list[Prompt], list[torch.Tensor], np.ndarray]:
        """``(prompts, rl_mask per micro-batch, bucket counts)`` for this DP rank's samples."""
        c = self.cfg
        tokens = torch.cat([b["tokens"] for b in batches]).numpy()
        labels = torch.cat([b["labels"] for b in batches]).numpy()
        loss_mask = torch.cat([b["loss_mask"] for b in batches]).numpy() > 0
        sample_ids = torch.cat([b["sample_ids"] for b in batches]).numpy()
        buckets = self.entropy.buckets(sample_ids)
        eligible = loss_mask & (labels != self.eod)
        eligible[:, : c.min_context_tokens - 1] = False
        chosen = sample_positions(buckets, eligible, self.probs(step), num, seed=(self.seed * 7919 + dp_rank), step=step)
        rows, cols = chosen.unravel(tokens.shape)
        budget = self.budget(step)
        prompts = []
        for r, t, bucket in zip(rows.tolist(), cols.tolist(), chosen.buckets.tolist()):
            context = tokens[r, max(0, t + 1 - c.context_tokens): t + 1].tolist()
            target = labels[r, t: t + c.target_tokens].tolist()
            if self.eod in target:
                target = target[: target.index(self.eod)]
            if c.prompt_template.strip() == "{context}":
                ids = context  # as they are: no decode/encode round trip
            else:
                text = build_prompt(self.tokenizer.detokenize(context), budget, c.prompt_template, c.answer_format)
                ids = self.tokenizer.tokenize(text)
            prompts.append(Prompt(ids=ids, budget=budget, target_bytes=continuation_bytes(self.tokenizer, context, target),
                                  bucket=bucket, meta={"row": r, "pos": t}))
        masks = rl_masks_from_positions(tokens.shape, rows, cols, batches[0]["tokens"].shape[0])
        return prompts, masks, chosen.counts

    def score(self, text: str, length: int, prompt: Prompt) -> tuple[float, rw.RewardResult, float]:
        c = self.cfg
        acc = score_next_token(text, prompt, c)
        r_len = rw.length_reward(length, prompt.budget)
        return float(rw.combine_rewards(acc.reward, r_len, c.reward_combine, c.reward_w_acc, c.reward_w_len)), acc, r_len


def read_problems(path: str, what: str) -> list[dict]:
    """``[{"prompt", "answer"}]`` from a JSONL file, one clear error for a bad file.

    Answers are kept as written; an answer holding ``####`` (a GSM8K solution) is graded by the
    text after its last ``####`` (:func:`~megatron_midtrain.rl.answers.reference_answer`), and is
    refused when nothing follows it."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist", f"set {what} to a JSONL file of {{\"prompt\", \"answer\"}} lines")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append({"prompt": str(row["prompt"]), "answer": str(row["answer"])})
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(f"{what} {path}: line {n} is not a JSON object with \"prompt\" and \"answer\" ({err})",
                                "fix that line") from None
            if GSM8K_MARKER in rows[-1]["answer"] and not reference_answer(rows[-1]["answer"]):
                raise UserError(f"{what} {path}: line {n}'s answer has nothing after its last {GSM8K_MARKER}",
                                f"end the answer with '{GSM8K_MARKER} <final answer>' as GSM8K does")
    if not rows:
        raise UserError(f"{what} {path} has no problems", "give at least one {\"prompt\", \"answer\"} line")
    return rows


def demo_problems(cfg) -> tuple[list[dict], list[dict]]:
    """(training, held-out) arithmetic problems of the embedded demo corpus."""
    from megatron_midtrain.data.corpus import format_math_prompt
    from megatron_midtrain.data.demo import default_cache_dir, ensure_demo_assets

    assets = ensure_demo_assets(cfg.run.cache_dir or default_cache_dir())
    train = []
    with open(assets.corpus_path, encoding="utf-8") as fh:
        for line in fh:
            doc = json.loads(line)
            if doc.get("kind") == "math":
                train.append({"prompt": format_math_prompt(doc["question"]), "answer": str(doc["answer"])})
    held_out = [{"prompt": d["prompt"], "answer": str(d["answer"])} for d in map(json.loads, open(assets.math_eval_path, encoding="utf-8"))]
    return train, held_out


class VerifiableTask:
    """Problems with checkable answers; exact-match reward (no length reward, no NTP)."""

    uses_corpus = False

    def __init__(self, trainer):
        cfg = trainer.cfg
        self.cfg = cfg.method
        self.tokenizer = trainer.data.tokenizer
        self.seed = cfg.run.seed
        if self.cfg.task_file is None or self.cfg.eval_file is None:
            if cfg.data.paths:
                raise UserError("method=grpo on your own data needs method.task_file (and method.eval_file)",
                                "set them to JSONL files of {\"prompt\", \"answer\"} lines")
            demo_train, demo_eval = demo_problems(cfg)
        self.problems = read_problems(self.cfg.task_file, "method.task_file") if self.cfg.task_file else demo_train
        self.held_out = read_problems(self.cfg.eval_file, "method.eval_file") if self.cfg.eval_file else demo_eval
        self.held_out = self.held_out[: self.cfg.eval_problems]

    def prompts(self, step: int, num: int, dp_rank: int, dp: int) -> list[Prompt]:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, step])
        picks = rng.choice(len(self.problems), size=num * dp, replace=len(self.problems) < num * dp)
        mine = picks[dp_rank * num:(dp_rank + 1) * num]
        return [Prompt(ids=self.tokenizer.tokenize(self.problems[i]["prompt"]), answer=self.problems[i]["answer"]) for i in mine]

    def score(self, text: str, length: int, prompt: Prompt) -> tuple[float, rw.RewardResult, float]:
        acc = score_verifiable(text, prompt, self.cfg)
        return acc.reward, acc, 0.0
