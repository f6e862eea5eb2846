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

from megatron_midtrain.config.methods import (  # noqa: F401  (the method group, re-exported with the schema)
    GRPOMethodConfig,
    KDMethodConfig,
    MethodConfig,
    NTPMethodConfig,
    ReMiTMethodConfig,
    Rho1MethodConfig,
    RLMethodConfig,
    RMTMethodConfig,
)
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
    and broadcast, so every rank agrees. One live run per directory (``<dir>/run.lock``)."""
    lock_stale_s: float = 600.0
    """A ``run.lock`` written on another host counts as left by a dead run once its heartbeat
    (refreshed every min(30 s, this / 4)) is older than this, and is taken over. Same-host
    locks are checked by pid and flock instead."""
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
