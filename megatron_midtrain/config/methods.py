"""The ``method`` config group: one dataclass per training method (registered in Hydra's ConfigStore
by :func:`megatron_midtrain.config.schema.register_configs`; ``method=<name>`` picks one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

from megatron_midtrain.config.rl_rules import (AGG_MODES, ANSWER_NORMALIZE_MODES, DEFAULT_DISTRIBUTIONS, PROMPT_ANSWER_FORMATS,
                                              answer_regex_problem, canonical_agg, check_curriculum, template_fields,
                                              validate_template)
from megatron_midtrain.errors import UserError


@dataclass
class MethodConfig:
    """Base of every method; ``name`` selects the loss implementation."""

    name: str = MISSING
    """Registered method name."""


@dataclass
class NTPMethodConfig(MethodConfig):
    name: str = "ntp"
    """Vanilla next-token prediction: sum(mask * -logp) / sum(mask) over the global batch."""


@dataclass
class ReMiTMethodConfig(MethodConfig):
    name: str = "remit"
    """ReMiT: tokens reweighted by a frozen RL-tuned reference (needs reference.checkpoint)."""
    clip_eps: float = 0.2
    """epsilon of eq. 5: weights are clipped to [1 - eps, 1 + eps]."""
    center: str = "sequence"
    """Centring of the log-prob gap: sequence (paper, eq. 4), document (per EOD-separated document) or none."""

    def __post_init__(self):
        if not 0.0 <= self.clip_eps < 1.0:
            raise UserError(f"method.clip_eps={self.clip_eps} must be in [0, 1)", "e.g. method.clip_eps=0.2 (the paper's value)")
        if self.center not in ("sequence", "document", "none"):
            raise UserError(f"method.center={self.center!r} is unknown", "use sequence, document or none")


@dataclass
class Rho1MethodConfig(MethodConfig):
    name: str = "rho1"
    """RHO-1: NTP on the top keep_ratio tokens by excess loss -logp_theta + logp_ref (needs a reference)."""
    keep_ratio: float = 0.8
    """Fraction of the loss tokens kept."""
    scope: str = "global"
    """global: one threshold over the global batch (one extra forward pass); microbatch: per micro-batch."""

    def __post_init__(self):
        if not 0.0 < self.keep_ratio <= 1.0:
            raise UserError(f"method.keep_ratio={self.keep_ratio} must be in (0, 1]", "e.g. method.keep_ratio=0.8")
        if self.scope not in ("global", "microbatch"):
            raise UserError(f"method.scope={self.scope!r} is unknown", "use global or microbatch")


@dataclass
class KDMethodConfig(MethodConfig):
    name: str = "kd"
    """Knowledge distillation: forward KL from the reference (teacher) over the full vocabulary."""
    temperature: float = 1.0
    """Softmax temperature T of teacher and student (the KD term is scaled by T^2)."""
    alpha: float = 1.0
    """Mix: alpha * KD + (1 - alpha) * NTP."""

    def __post_init__(self):
        if self.temperature <= 0:
            raise UserError(f"method.temperature={self.temperature} must be > 0", "e.g. method.temperature=1.0")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"method.alpha={self.alpha} must be in [0, 1]", "e.g. method.alpha=0.5")


def _positive(owner: str, **values) -> None:
    for key, value in values.items():
        if value is None or value <= 0:
            raise UserError(f"{owner}.{key}={value} must be > 0", f"set {owner}.{key} to a positive value")


@dataclass
class RLMethodConfig(MethodConfig):
    """Shared GRPO rollout-loop settings of the RL methods (``rmt``, ``grpo``)."""

    prompts_per_step: int = 64
    """Prompts per optimizer step, over all data-parallel ranks (must divide by DP)."""
    group_size: int = 8
    """G: rollouts sampled per prompt (the GRPO group)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability."""
    max_new_tokens: int = 1024
    """Longest response, in tokens, until the first step of max_new_tokens_steps."""
    max_new_tokens_steps: List[int] = field(default_factory=list)
    """Max-length schedule (OctoThinker-style step-up): from step max_new_tokens_steps[i] on, the
    longest response is max_new_tokens_values[i]. Empty = max_new_tokens throughout."""
    max_new_tokens_values: List[int] = field(default_factory=list)
    """Response lengths of the schedule, one per entry of max_new_tokens_steps."""
    stop_strings: List[str] = field(default_factory=list)
    """A response ends when its text contains one of these (kept in the response)."""
    stop_at_eos: bool = True
    """A response ends at the tokenizer's EOS/EOD token (kept in the response)."""
    answer_format: str = "answer_tag"
    """Where the answer is read (the last occurrence counts): answer_tag (<answer>…</answer>),
    boxed (\\boxed{…}), answer_is ("The answer is …", the demo arithmetic), plain (the whole
    response, for base models that have never seen an answer format, e.g. the CPU demo; RMT
    compares its bytes as they read after the prompt, whitespace included), gsm8k
    (the rest of the line after the last "####") or regex (group 1 of the last match of
    answer_regex). A reference answer holding "####" (a GSM8K solution) is graded by the text
    after its last "####", whatever the format."""
    answer_regex: Optional[str] = None
    """answer_format=regex only: a Python regex with at least one capture group; the answer is
    group 1 of its LAST match in the response (no match: missing). Inline flags such as (?i)."""
    answer_normalize: str = "none"
    """method=grpo: how answers compare. none (default): the exact-match comparison as before
    (whitespace, $ and commas dropped, then numerals by exact value, else the string); numeric:
    strip whitespace, a trailing ".", a leading "$" and "," thousands separators, then numbers
    compare by exact value (1,000 = 1000, $5 = 5, 5.0 = 5, -3 = -3.00), other text as strings."""
    missing_penalty: float = -1.0
    """Correctness reward of a response without a parseable answer (missing tag)."""
    empty_penalty: float = -1.0
    """Correctness reward of an empty answer."""
    eps_low: float = 0.2
    """epsilon_low of the clipped ratio clip(rho, 1 - eps_low, 1 + eps_high)."""
    eps_high: float = 0.2
    """epsilon_high of the clipped ratio (DAPO's clip-higher when > eps_low)."""
    kl_beta: float = 0.0
    """beta: weight of the k3 KL to reference.checkpoint (0 = off, no reference is loaded)."""
    kl_clamp: float = 10.0
    """Per-token k3 estimates are clamped to [-kl_clamp, kl_clamp] (verl's low_var_kl uses 10), so a
    policy far from the reference gets a bounded KL and gradient instead of e^20; 0 = no clamp."""
    loss_agg: str = "token-mean"
    """GRPO loss aggregation: token-mean, seq-mean-token-mean or drgrpo (seq-mean-token-sum-norm)."""
    no_std: bool = False
    """Dr.GRPO advantages: r - mean(r) without dividing by the group std."""
    rollout_micro_batch_size: int = 8
    """Rollout sequences per micro-batch of the log-prob recompute and the update."""
    ppo_mini_batches: int = 1
    """Optimizer updates per pass over a rollout batch (verl's train batch / ppo_mini_batch_size):
    the rollouts (and RMT's corpus micro-batches) are split into this many contiguous mini-batches,
    one update each. Must divide the rollout micro-batches per DP rank."""
    ppo_epochs: int = 1
    """Passes over each rollout batch (verl's ppo_epochs). With ppo_mini_batches * ppo_epochs = 1
    the single update is on-policy: the ratio is 1 and no old log-probs are recomputed; with more,
    old log-probs are recorded once per rollout batch, before the first update."""
    clip_ratio_c: float = 0.0
    """Dual-clip (verl's clip_ratio_c, Ye et al. 2020): for A < 0 the token loss is capped at
    -c * A, so a ratio far above 1 cannot push a negative-advantage token without bound. 0 = off;
    otherwise > 1 (verl's default is 3.0)."""
    generation_batch_rows: int = 64
    """Most rollout rows generated together (one KV-cache batch; prompts of different lengths are
    left-padded and masked)."""

    def __post_init__(self):
        _positive("method", prompts_per_step=self.prompts_per_step, group_size=self.group_size,
                  max_new_tokens=self.max_new_tokens, rollout_micro_batch_size=self.rollout_micro_batch_size,
                  generation_batch_rows=self.generation_batch_rows, ppo_mini_batches=self.ppo_mini_batches,
                  ppo_epochs=self.ppo_epochs)
        if self.clip_ratio_c != 0 and self.clip_ratio_c <= 1.0:
            raise UserError(f"method.clip_ratio_c={self.clip_ratio_c} must be > 1 (or 0 = off)", "e.g. method.clip_ratio_c=3.0 (verl's value)")
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0:
            raise UserError(f"method.temperature={self.temperature}, method.top_p={self.top_p} out of range",
                            "use temperature >= 0 and 0 < top_p <= 1")
        if len(self.max_new_tokens_steps) != len(self.max_new_tokens_values):
            raise UserError("method.max_new_tokens_steps and method.max_new_tokens_values differ in length",
                            "give one length per schedule step")
        if list(self.max_new_tokens_steps) != sorted(self.max_new_tokens_steps) or any(v <= 0 for v in self.max_new_tokens_values):
            raise UserError("method.max_new_tokens_steps must be increasing with positive max_new_tokens_values",
                            "e.g. method.max_new_tokens_steps=[100,200] method.max_new_tokens_values=[2048,4096]")
        if self.answer_format not in PROMPT_ANSWER_FORMATS:
            raise UserError(f"method.answer_format={self.answer_format!r} is unknown", f"use one of {', '.join(PROMPT_ANSWER_FORMATS)}")
        if self.answer_format == "regex" and not self.answer_regex:
            raise UserError("method.answer_format=regex needs method.answer_regex",
                            "e.g. method.answer_regex='Final answer: *(\\S+)' (group 1 is the answer)")
        if self.answer_format != "regex" and self.answer_regex is not None:
            raise UserError(f"method.answer_regex is set but method.answer_format={self.answer_format}",
                            "set method.answer_format=regex, or drop method.answer_regex")
        if self.answer_format == "regex":
            problem = answer_regex_problem(self.answer_regex)
            if problem:
                raise UserError(f"method.answer_regex={self.answer_regex!r} {problem}",
                                "give a Python regex whose first group (...) captures the answer, e.g. 'Answer: *(\\S+)'")
        if self.answer_normalize not in ANSWER_NORMALIZE_MODES:
            raise UserError(f"method.answer_normalize={self.answer_normalize!r} is unknown",
                            f"use one of {', '.join(ANSWER_NORMALIZE_MODES)}")
        if not (0.0 <= self.eps_low < 1.0 and self.eps_high >= 0.0):
            raise UserError(f"method.eps_low={self.eps_low}, eps_high={self.eps_high} out of range", "e.g. eps_low=0.2 eps_high=0.28")
        if self.kl_clamp < 0:
            raise UserError(f"method.kl_clamp={self.kl_clamp} must be >= 0", "e.g. method.kl_clamp=10 (verl's value; 0 = off)")
        if self.kl_beta < 0:
            raise UserError(f"method.kl_beta={self.kl_beta} must be >= 0", "e.g. method.kl_beta=0.0")
        try:
            canonical_agg(self.loss_agg)
        except ValueError:
            raise UserError(f"method.loss_agg={self.loss_agg!r} is unknown", f"use one of {', '.join(AGG_MODES)} or drgrpo") from None

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per rollout batch (the LR schedule counts these)."""
        return self.ppo_mini_batches * self.ppo_epochs

    def max_new_tokens_at(self, step: int) -> int:
        """The max-length schedule: the response limit at (1-based) ``step``."""
        value = self.max_new_tokens
        for start, v in zip(self.max_new_tokens_steps, self.max_new_tokens_values):
            if step >= start:
                value = v
        return value


@dataclass
class RMTMethodConfig(RLMethodConfig):
    name: str = "rmt"
    """RMT: GRPO next-token reasoning on high-entropy positions + lambda * NTP on the other tokens."""
    entropy_dirs: List[str] = field(default_factory=list)
    """One entropy index per data.paths entry (tools/preprocess_entropy.py), checked against its
    dataset at start. Empty on the demo data: built from the demo base model and cached."""
    curriculum: List[List[float]] = field(default_factory=lambda: [list(d) for d in DEFAULT_DISTRIBUTIONS])
    """Three (easy, medium, hard) sampling distributions, reached at step 0, t1*T and t2*T
    (piecewise-linear in between; the paper does not publish its values, these are ours)."""
    t1: float = 0.3
    """First curriculum knot, as a fraction of train.max_steps."""
    t2: float = 0.7
    """Second curriculum knot, as a fraction of train.max_steps."""
    budget_b0: int = 800
    """B0 of the token budget B_t = max(B_min, floor(B0 * gamma^(t/T)))."""
    budget_gamma: float = 0.2
    """gamma of the token budget decay."""
    budget_min: int = 1
    """B_min of the token budget."""
    ntp_weight: float = 0.1
    """lambda of L = L_RL + lambda * L_NTP (NTP over the tokens not selected for RL)."""
    prompt_template: str = (
        "Complete the text below by predicting the next token. Think step by step using about {budget} "
        "tokens, then give the predicted next token {answer_hint}.\n\nText:\n{context}\n\nReasoning:\n"
    )
    """Prompt of a selected position (str.format fields: context, budget, answer_hint). Exactly
    "{context}" feeds the context tokens as they are (no instruction; base models / the demo)."""
    context_tokens: int = 512
    """Context of a prompt: at most this many tokens before (and including) the position."""
    min_context_tokens: int = 16
    """Positions with less context than this are never selected."""
    target_tokens: int = 8
    """Ground-truth continuation tokens a prediction may match (RPT: a prefix ending on a token boundary)."""
    reward_combine: str = "sum"
    """r = r_acc + r_len (sum, default), weighted (w_acc*r_acc + w_len*r_len) or product."""
    reward_w_acc: float = 1.0
    """w_acc of the weighted combination."""
    reward_w_len: float = 1.0
    """w_len of the weighted combination."""

    def __post_init__(self):
        super().__post_init__()
        try:
            check_curriculum(self.curriculum, self.t1, self.t2)
            validate_template(self.prompt_template)
        except ValueError as err:
            raise UserError(f"method config: {err}", "fix method.curriculum / method.t1 / method.t2 / method.prompt_template") from None
        _positive("method", budget_b0=self.budget_b0, budget_gamma=self.budget_gamma, budget_min=self.budget_min,
                  context_tokens=self.context_tokens, target_tokens=self.target_tokens)
        if self.ntp_weight < 0:
            raise UserError(f"method.ntp_weight={self.ntp_weight} must be >= 0", "e.g. method.ntp_weight=0.1 (the paper's lambda)")
        if self.reward_combine not in ("sum", "weighted", "product"):
            raise UserError(f"method.reward_combine={self.reward_combine!r} is unknown", "use sum, weighted or product")
        if not 1 <= self.min_context_tokens <= self.context_tokens:
            raise UserError("method.min_context_tokens must be in [1, method.context_tokens]", "lower method.min_context_tokens")
        if self.answer_normalize != "none":
            raise UserError(f"method.answer_normalize={self.answer_normalize} does not apply to method=rmt "
                            "(a next-token prediction is graded by byte prefix match)", "drop method.answer_normalize")
        if self.answer_format == "regex" and "answer_hint" in template_fields(self.prompt_template):
            raise UserError("method.answer_format=regex has no {answer_hint} for method.prompt_template",
                            "write the answer instructions into method.prompt_template instead of {answer_hint}")


@dataclass
class GRPOMethodConfig(RLMethodConfig):
    name: str = "grpo"
    """Verifiable-task GRPO post-training: prompts with known answers, exact-match reward."""
    task_file: Optional[str] = None
    """JSONL of {"prompt", "answer"} training problems (an answer holding "####", e.g. GSM8K's full
    solution, is graded by the text after its last "####"). None = the demo corpus's arithmetic problems."""
    eval_file: Optional[str] = None
    """JSONL of held-out {"prompt", "answer"} problems for greedy accuracy. None = the demo's held-out set."""
    eval_problems: int = 200
    """Held-out problems scored (greedy) before training, every train.eval_interval steps, and at the end (0 = never)."""
    answer_format: str = "answer_is"
    """See RLMethodConfig; the demo arithmetic ends with "The answer is N."."""
    max_new_tokens: int = 64
    """Longest response, in tokens."""
    stop_strings: List[str] = field(default_factory=lambda: ["\n"])
    """A response ends at a newline (one answer line)."""
