"""Structured configuration: one dataclass per component, registered in Hydra's ConfigStore.

Every field has a docstring (the string literal under it). Hydra validates YAML
files and command-line overrides against these classes, so an unknown key or a
wrong type fails before any work starts. Cross-field checks live in
``__post_init__`` (single component) or :func:`validate` (across components /
the world size, which is known only at run time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from megatron_midtrain.config.rl_rules import (AGG_MODES, DEFAULT_DISTRIBUTIONS, PROMPT_ANSWER_FORMATS, canonical_agg, check_curriculum,
                                              validate_template)
from megatron_midtrain.errors import UserError


@dataclass
class WandbConfig:
    """Weights & Biases logging (rank 0 only); off unless ``project`` is set."""

    project: str = ""
    """W&B project to log to. Empty = W&B logging off. Needs ``pip install -e ".[wandb]"``."""
    entity: Optional[str] = None
    """W&B team or user (None = the logged-in user's default entity)."""
    name: Optional[str] = None
    """Display name of the W&B run. None = run.name."""
    group: Optional[str] = None
    """W&B group, e.g. to show the runs of a sweep together."""
    tags: List[str] = field(default_factory=list)
    """W&B tags of the run."""
    mode: str = "online"
    """online (stream to the server), offline (write ``<dir>/wandb/offline-run-*``, upload later
    with ``wandb sync``) or disabled (no-op)."""
    dir: Optional[str] = None
    """Where W&B keeps its local files (a ``wandb/`` folder inside it). None = run.dir."""

    def __post_init__(self):
        if self.mode not in ("online", "offline", "disabled"):
            raise UserError(f"run.wandb.mode={self.mode!r} is unknown", "use online, offline or disabled")


@dataclass
class ProfilerConfig:
    """torch.profiler trace + memory/throughput summary of a few steps (``<run.dir>/profile/``)."""

    start_step: int = 0
    """First profiled step (1-based). 0 = profiler off. A resumed run that starts after it profiles nothing."""
    num_steps: int = 2
    """Number of consecutive steps profiled from start_step."""
    record_shapes: bool = False
    """Record operator input shapes (bigger trace, lets the summary group by shape)."""
    profile_memory: bool = True
    """Track tensor allocations (memory columns in the summary, memory timeline in the trace)."""
    with_stack: bool = False
    """Record Python stacks of the operators (much bigger trace and more overhead)."""
    ranks: List[int] = field(default_factory=lambda: [0])
    """Global ranks that profile (each writes its own ``rank<R>_*`` files)."""

    def __post_init__(self):
        if self.start_step < 0:
            raise UserError(f"run.profiler.start_step={self.start_step} must be >= 0", "0 = off, or e.g. run.profiler.start_step=10")
        if self.num_steps < 1:
            raise UserError(f"run.profiler.num_steps={self.num_steps} must be >= 1", "e.g. run.profiler.num_steps=2")
        if self.start_step and (not self.ranks or any(r < 0 for r in self.ranks)):
            raise UserError(f"run.profiler.ranks={list(self.ranks)} must name global ranks >= 0", "e.g. run.profiler.ranks=[0]")


@dataclass
class RunConfig:
    dir: Optional[str] = None
    """Run directory (config.yaml, metrics.jsonl, checkpoints, plots). Re-using a
    directory resumes it. Default: ``runs/<name>-<UTC timestamp>``, chosen by rank 0
    and broadcast, so every rank agrees."""
    name: str = "midtrain"
    """Short run name, used in the default run directory."""
    seed: int = 1234
    """Global seed: model init, data order and dropout all derive from it."""
    cache_dir: Optional[str] = None
    """Cache for the embedded demo assets (corpus, tokenizer, indexed data).
    Default: ``$MIDTRAIN_CACHE`` or ``~/.cache/megatron_midtrain``."""
    tensorboard: bool = False
    """Also write TensorBoard event files under ``<run.dir>/tensorboard``."""
    plot: bool = True
    """Write ``<run.dir>/metrics.png`` (loss and method statistics) at each save and at the end."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging (``run.wandb.project=...`` turns it on)."""
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)
    """torch.profiler trace of a few steps (``run.profiler.start_step=N`` turns it on)."""


@dataclass
class ModelConfig:
    name: str = "demo-llama-tiny"
    """Preset name (informational; recorded in checkpoints)."""
    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 128
    """Model width."""
    ffn_hidden_size: int = 352
    """SwiGLU inner width (per gate/up projection)."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: Optional[int] = 2
    """Key/value heads (GQA). None = same as num_attention_heads (MHA)."""
    head_dim: Optional[int] = None
    """Per-head width (``kv_channels``). None = hidden_size / num_attention_heads."""
    vocab_size: int = 2048
    """Model vocabulary (embedding rows before TP padding). Must be >= the tokenizer's."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding table to a multiple of this (independent of TP, so checkpoints reshard)."""
    max_position_embeddings: int = 4096
    """Longest sequence RoPE is prepared for."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling_factor: Optional[float] = None
    """Llama-3.1 style RoPE scaling factor (None = no scaling)."""
    no_rope_layers: Optional[List[int]] = None
    """Per-layer NoPE flags, 1 = skip RoPE in that layer (SmolLM3). None = RoPE everywhere."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    qkv_bias: bool = False
    """Bias on the Q/K/V projections (Qwen2/2.5)."""
    qk_norm: bool = False
    """RMSNorm on queries and keys (Qwen3, OLMo-2); see qk_norm_scope."""
    qk_norm_scope: str = "head"
    """head: one norm per head over head_dim (Qwen3); full: over all heads together (OLMo-2)."""
    norm_placement: str = "pre"
    """pre: x + f(norm(x)) (Llama, Qwen, SmolLM3); post: x + norm(f(x)) (OLMo-2)."""
    tie_embeddings: bool = True
    """Share the input embedding and the output projection."""
    init_std: float = 0.02
    """Std of the normal initialisation of weights."""
    hidden_dropout: float = 0.0
    """Dropout after attention / MLP (0 for mid-training; keeps runs parallelism-invariant)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""

    def __post_init__(self):
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise UserError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_query_groups={groups}",
                "choose num_query_groups that divides num_attention_heads",
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"model.hidden_size={self.hidden_size} is not divisible by num_attention_heads",
                "set model.head_dim explicitly",
            )
        if self.qk_norm_scope not in ("head", "full"):
            raise UserError(f"model.qk_norm_scope={self.qk_norm_scope!r} is unknown", "use head (Qwen3) or full (OLMo-2)")
        if self.norm_placement not in ("pre", "post"):
            raise UserError(f"model.norm_placement={self.norm_placement!r} is unknown", "use pre (Llama/Qwen) or post (OLMo-2)")
        if self.no_rope_layers is not None and len(self.no_rope_layers) != self.num_layers:
            raise UserError(
                f"model.no_rope_layers has {len(self.no_rope_layers)} entries for {self.num_layers} layers",
                "give one 0/1 flag per layer",
            )


@dataclass
class DataConfig:
    paths: List[str] = field(default_factory=list)
    """Indexed dataset prefixes (``PREFIX.bin``/``PREFIX.idx``). Empty = the embedded demo corpus."""
    weights: Optional[List[float]] = None
    """Blend weights, one per path (normalised by megatron-core). None = weight by dataset size."""
    tokenizer: Optional[str] = None
    """SentencePiece ``.model`` or HF ``tokenizer.json`` / folder. Empty = the demo tokenizer."""
    seq_length: int = 128
    """Tokens per training sample."""
    split: str = "98,2,0"
    """Train/validation/test split of each dataset, in documents (megatron-core syntax)."""
    reset_position_ids: bool = False
    """Restart position ids after each EOD. Not supported yet: megatron-core's GPTModel builds
    RoPE from the sequence position and ignores position ids, so this is refused."""
    reset_attention_mask: bool = False
    """Block attention across EOD boundaries (document masking)."""
    eod_mask_loss: bool = False
    """Exclude the EOD token from the loss."""
    demo_math_weight: float = 0.5
    """Embedded demo only: share of step-by-step arithmetic documents in the blend."""
    demo_sft_steps: int = 200
    """Embedded demo only: NTP steps of the sft demo model on the arithmetic (it starts the demo GRPO runs:
    the ReMiT demo's RL-tuned reference and experiment=grpo_demo). 200 keeps the default ``midtrain`` within
    5 minutes on 2 CPU cores but solves only ~5% of the problems; at ~700 the model copies the question's
    numbers and solves ~30%, which verifiable-task GRPO needs to have correct rollouts to learn from."""


    def __post_init__(self):
        if self.demo_sft_steps < 1:
            raise UserError(f"data.demo_sft_steps={self.demo_sft_steps} must be >= 1", "e.g. data.demo_sft_steps=700")
        if self.reset_position_ids:
            raise UserError(
                "data.reset_position_ids=true has no effect: megatron-core's RoPE ignores position ids",
                "leave it false; use data.reset_attention_mask=true to keep documents apart",
            )


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    cp: int = 1
    """Context-parallel size. Only 1 for now: splitting each sequence across CP ranks (and the
    per-row ReMiT centring, RHO-1 selection and RL rollouts over it) is not implemented, so
    values > 1 are refused rather than silently training on unsplit sequences."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1)."""
    distributed_optimizer: bool = False
    """Shard optimizer state across data-parallel ranks (GPU)."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl with CUDA, else gloo), nccl or gloo."""

    def __post_init__(self):
        for name in ("tp", "pp", "cp"):
            if getattr(self, name) < 1:
                raise UserError(f"parallel.{name}={getattr(self, name)} must be >= 1", f"set parallel.{name}=1 or more")
        if self.cp > 1:
            raise UserError(
                f"parallel.cp={self.cp}: context parallelism is not implemented yet (nothing splits a sequence across CP ranks)",
                "use parallel.cp=1; for long sequences use parallel.sequence_parallel=true with parallel.tp > 1",
            )
        if self.sequence_parallel and self.tp == 1:
            raise UserError("parallel.sequence_parallel=true needs parallel.tp > 1", "set parallel.tp>=2 or disable it")


@dataclass
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps. Re-running a run.dir with a larger value resumes and continues."""
    global_batch_tokens: int = 4096
    """Tokens per optimizer step (global batch); must be a multiple of data.seq_length * micro_batch_size * DP."""
    micro_batch_size: int = 4
    """Samples per micro-batch on each data-parallel rank."""
    save_interval: int = 100
    """Save a checkpoint every N steps (and always at the end). 0 = only at the end."""
    keep_checkpoints: int = 2
    """Keep this many most recent complete checkpoints (0 = keep all)."""
    async_save: bool = False
    """Write checkpoints in a background process (megatron dist_checkpointing's async save) while
    training continues. A checkpoint becomes complete (meta.json, ``latest``) only after every
    rank's write has finished: at the next step that finds it done, the next save, the end of
    training or Trainer.close(). A crash before that leaves only ``iter_N.partial``."""
    eval_interval: int = 50
    """Validation loss every N steps (and at the end). 0 = never."""
    eval_batches: int = 4
    """Global batches per validation."""
    log_interval: int = 10
    """Print a progress line every N steps (metrics.jsonl gets every step)."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0 = off)."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), bf16 or fp32."""
    max_consecutive_nonfinite: int = 3
    """A NaN/inf loss skips the step; this many in a row stops the run."""
    init_from: Optional[str] = None
    """Start a fresh run from this checkpoint's model weights (a run dir or checkpoint; the
    optimizer and LR schedule start fresh). Ignored when run.dir already has a checkpoint."""
    exit_at_step: Optional[int] = None
    """Stop cleanly after this step (checkpoint written) without changing the LR schedule,
    e.g. to split a run across SLURM allocations. SIGTERM/SIGUSR1 do the same at the next step."""

    def __post_init__(self):
        if self.max_steps < 1:
            raise UserError(f"train.max_steps={self.max_steps} must be >= 1", "set train.max_steps to a positive number")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise UserError(f"train.precision={self.precision!r} is not one of auto, bf16, fp32", "pick one of those")


@dataclass
class OptimizerConfig:
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Final learning rate of the decay (ReMiT uses 1e-7)."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    """cosine (decay to optimizer.min_lr), wsd (constant stable stage, then decay), linear or constant."""
    warmup_steps: int = 10
    """Linear warmup steps (0 = none)."""
    wsd_decay_fraction: float = 0.2
    """wsd only: fraction of the steps spent in the final decay stage."""
    wsd_decay_style: str = "cosine"
    """wsd only: shape of the decay stage: cosine, linear, exponential or minus_sqrt."""

    def __post_init__(self):
        if self.name not in ("cosine", "wsd", "constant", "linear"):
            raise UserError(f"schedule.name={self.name!r} is unknown", "use cosine, wsd, linear or constant")
        if not 0.0 < self.wsd_decay_fraction <= 1.0:
            raise UserError("schedule.wsd_decay_fraction must be in (0, 1]", "e.g. schedule.wsd_decay_fraction=0.2")


@dataclass
class ReferenceConfig:
    """The frozen reference model of the reference-based methods (ReMiT, RHO-1, KD)."""

    checkpoint: Optional[str] = None
    """Reference checkpoint (a run dir or an iter_* dir). Same architecture, vocabulary and
    tokenizer as the policy, checked at start. On the demo data, left unset, the cached demo
    reference is built and used. Loaded co-located: same processes, same TP/PP sharding,
    frozen, eval mode, no gradients or optimizer state."""
    mode: str = "colocated"
    """colocated: run the reference forward inside the training job (one forward-only
    pipeline pass per step before the policy's). offline: read the target-token log-probs
    that tools/score_reference.py stored for exactly these training samples; the reference
    model is never built (ReMiT and RHO-1; KD needs the full distribution, so it refuses offline)."""
    scores: Optional[str] = None
    """Offline mode: the score store directory written by tools/score_reference.py. It must
    have been scored with this run's data, seed, sequence length, global batch and tokenizer."""
    fp8: bool = False
    """Co-located mode on GPUs with Transformer Engine: run the reference's GEMMs in fp8
    (E4M3, megatron's delayed-scaling recipe); weights stay in the policy's dtype. Saves
    reference compute, at a small cost in log-prob precision. Refused without CUDA + TE.
    Not yet validated on a GPU."""

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
    """Where the answer is read: answer_tag (<answer>…</answer>), boxed (\\boxed{…}),
    answer_is ("The answer is …", the demo arithmetic) or plain (the whole response, for base
    models that have never seen an answer format, e.g. the CPU demo)."""
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
    loss_agg: str = "token-mean"
    """GRPO loss aggregation: token-mean, seq-mean-token-mean or drgrpo (seq-mean-token-sum-norm)."""
    no_std: bool = False
    """Dr.GRPO advantages: r - mean(r) without dividing by the group std."""
    rollout_micro_batch_size: int = 8
    """Rollout sequences per micro-batch of the log-prob recompute and the update."""
    generation_batch_rows: int = 64
    """Most rollout rows generated together (one KV-cache batch; prompts of different lengths are
    left-padded and masked)."""

    def __post_init__(self):
        _positive("method", prompts_per_step=self.prompts_per_step, group_size=self.group_size,
                  max_new_tokens=self.max_new_tokens, rollout_micro_batch_size=self.rollout_micro_batch_size,
                  generation_batch_rows=self.generation_batch_rows)
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
            raise UserError(f"method.answer_format={self.answer_format!r} is unknown", "use answer_tag, boxed, answer_is or plain")
        if not (0.0 <= self.eps_low < 1.0 and self.eps_high >= 0.0):
            raise UserError(f"method.eps_low={self.eps_low}, eps_high={self.eps_high} out of range", "e.g. eps_low=0.2 eps_high=0.28")
        if self.kl_beta < 0:
            raise UserError(f"method.kl_beta={self.kl_beta} must be >= 0", "e.g. method.kl_beta=0.0")
        try:
            canonical_agg(self.loss_agg)
        except ValueError:
            raise UserError(f"method.loss_agg={self.loss_agg!r} is unknown", f"use one of {', '.join(AGG_MODES)} or drgrpo") from None

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


@dataclass
class GRPOMethodConfig(RLMethodConfig):
    name: str = "grpo"
    """Verifiable-task GRPO post-training: prompts with known answers, exact-match reward."""
    task_file: Optional[str] = None
    """JSONL of {"prompt", "answer"} training problems. None = the demo corpus's arithmetic problems."""
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


@dataclass
class LMEvalConfig:
    tasks: List[str] = field(default_factory=list)
    """lm-evaluation-harness tasks (or presets, e.g. preset:remit_fewshot) run during training.
    Empty = off. Needs the harness (pip install -e .[eval])."""
    interval: int = 0
    """Run them every N steps (and at the end); 0 = only at the end of training."""
    num_fewshot: Optional[int] = None
    """Shots for tasks outside a preset (None = each task's default)."""
    limit: Optional[float] = None
    """Examples per task (or a fraction if < 1); None = all. Keep it small: it runs in the training job."""
    include_path: Optional[str] = None
    """Folder of extra task YAML files (e.g. local tasks)."""
    max_length: Optional[int] = None
    """Context window for evaluation (None = data.seq_length)."""
    batch_tokens: int = 8192
    """Padded tokens per forward pass."""

    def __post_init__(self):
        if self.interval < 0:
            raise UserError(f"lm_eval.interval={self.interval} must be >= 0", "e.g. lm_eval.interval=1000")


@dataclass
class MidtrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    """Run directory, seed, outputs."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets, tokenizer and sequence length."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP/PP/CP/DP layout."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop length, batch size, checkpoints, evaluation."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW hyper-parameters."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """Frozen reference model (reference-based methods)."""
    lm_eval: LMEvalConfig = field(default_factory=LMEvalConfig)
    """Optional lm-evaluation-harness tasks during training (in addition to the validation loss)."""
    method: Any = MISSING
    """The training objective; chosen with ``method=<name>``."""


def register_configs() -> None:
    """Register the schema and the method group in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="midtrain_schema", node=MidtrainConfig)
    cs.store(group="method", name="ntp", node=NTPMethodConfig)
    cs.store(group="method", name="remit", node=ReMiTMethodConfig)
    cs.store(group="method", name="rho1", node=Rho1MethodConfig)
    cs.store(group="method", name="kd", node=KDMethodConfig)
    cs.store(group="method", name="rmt", node=RMTMethodConfig)
    cs.store(group="method", name="grpo", node=GRPOMethodConfig)
