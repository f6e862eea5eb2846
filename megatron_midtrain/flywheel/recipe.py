"""The flywheel's recipe: every stage's overrides, for the full run and for ``--quick``.

Pipeline (each box one cached stage, see pipeline.py)::

    base (NTP on the demo blend) ──► sft (NTP on arithmetic only) ──► rl_ref (GRPO, grpo_demo recipe)
      │                                 └─ the SFT-only reference        └─ the RL reference
      └──► mid-training, equal steps and tokens on the blend, per method x seed
             ├─ ntp │ remit (RL ref) │ remit_sft (SFT ref) │ rho1 │ kd │ rmt │ ablations
             └──► post-training, identical for every model: sft_post (arithmetic NTP) ──► grpo_post

The full recipe is the demo's: the base and sft stages are the demo models' recipe
(training/demo_models.py: 60 base steps; 700 sft steps at lr 3e-3, constant, half-size batches)
and rl_ref is ``experiment=grpo_demo`` (40 GRPO steps). Every mid-training method uses the same
optimizer and schedule (the defaults: lr 3e-3, cosine, 10 warmup steps) for the same steps on
the same blend; the seed sets the data order (the models start from the same base).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Mid-training methods: overrides (the reference, if any, is added by the runner).
METHODS = {
    "ntp": ["method=ntp"],
    "remit": ["method=remit"],
    "remit_sft": ["method=remit"],  # the SFT-only reference (the paper's SFT-guided ablation)
    "rho1": ["method=rho1"],
    "kd": ["method=kd"],
    "rmt": ["experiment=rmt_demo", "optimizer.lr=3e-3", "schedule.name=cosine", "schedule.warmup_steps=10"],
}
#: Which reference each method reads (None: none).
REFERENCE = {"remit": "rl", "remit_sft": "sft", "rho1": "rl", "kd": "rl"}
#: Ablations (mid-training and evaluation only, no post-training): ReMiT's centring and ε (RL
#: reference); RMT at its own demo recipe's optimizer (lr 1e-3, constant) instead of the shared
#: one, and with the NTP term at weight 1.
ABLATIONS = {
    "remit_doc": ["method=remit", "method.center=document"],
    "remit_eps0.1": ["method=remit", "method.clip_eps=0.1"],
    "remit_eps0.5": ["method=remit", "method.clip_eps=0.5"],
    "rmt_lr1e-3": ["experiment=rmt_demo"],
    # λ = 1 instead of the demo's 0.1: is the weak NTP term what lets the GRPO term's noise win?
    "rmt_ntp1": METHODS["rmt"] + ["method.ntp_weight=1.0"],
}
REFERENCE.update({"remit_doc": "rl", "remit_eps0.1": "rl", "remit_eps0.5": "rl"})
#: The method each ablation varies: it runs when that method is selected (``--methods``).
ABLATION_OF = {"remit_doc": "remit", "remit_eps0.1": "remit", "remit_eps0.5": "remit", "rmt_lr1e-3": "rmt", "rmt_ntp1": "rmt"}


@dataclass
class Recipe:
    """Sizes of every stage (``full()`` and ``quick()``)."""

    base_steps: int = 60
    sft_steps: int = 700
    rl_steps: int = 40
    mid_steps: int = 100
    post_sft_steps: int = 300
    post_grpo_steps: int = 10
    seeds: list = field(default_factory=lambda: [1, 2, 3])
    eval_problems: int = 500
    eval_batches: int = 16
    #: Checkpoints of the ReMiT runs every this many steps (the mechanism over training).
    mechanism_interval: int = 25
    ablations: bool = True
    #: RMT's entropy index dirs; None = the base model's, built once (minutes on 2 CPU cores). The
    #: quick run passes a synthetic one: it checks the pipeline, not the outcome.
    entropy_dirs: list | None = None
    #: Overrides every stage gets (sizes shared by all stages).
    common: list = field(default_factory=lambda: ["train.eval_interval=25", "train.log_interval=25", "run.plot=false"])
    #: Extra overrides of the GRPO stages, of RMT, and of the arithmetic sft stages.
    grpo_sizes: list = field(default_factory=list)
    rmt_sizes: list = field(default_factory=list)
    sft_sizes: list = field(default_factory=lambda: ["train.global_batch_tokens=2048"])  # demo_models.SFT_BATCH_FRACTION

    @classmethod
    def quick(cls) -> "Recipe":
        """A few-minute run of the whole pipeline (CI smoke test): tiny stages, 2 seeds, no ablations."""
        return cls(base_steps=4, sft_steps=4, rl_steps=1, mid_steps=3, post_sft_steps=2, post_grpo_steps=1, seeds=[1, 2],
                   eval_problems=8, eval_batches=1, mechanism_interval=3, ablations=False,
                   common=["train.eval_interval=0", "train.log_interval=1", "run.plot=false", "train.global_batch_tokens=1024",
                           "train.micro_batch_size=4"],
                   grpo_sizes=["method.prompts_per_step=4", "method.group_size=2", "method.max_new_tokens=16",
                               "method.rollout_micro_batch_size=4", "method.generation_batch_rows=8"],
                   rmt_sizes=["method.prompts_per_step=4", "method.group_size=2", "method.rollout_micro_batch_size=4"],
                   sft_sizes=[])

    def base(self) -> list[str]:
        return ["method=ntp", f"train.max_steps={self.base_steps}", "train.save_interval=0"]

    def sft(self, init: str, steps: int) -> list[str]:
        return ["method=ntp", "data.demo_math_weight=1.0", f"train.max_steps={steps}", f"train.init_from={init}",
                "optimizer.lr=3e-3", "schedule.name=constant", f"schedule.warmup_steps={min(5, steps // 10)}",
                "train.save_interval=100"] + self.sft_sizes

    def grpo(self, init: str, steps: int) -> list[str]:
        return ["experiment=grpo_demo", f"train.max_steps={steps}", f"train.init_from={init}",
                f"method.eval_problems={self.eval_problems}", "train.save_interval=10"] + self.grpo_sizes

    def mid(self, method: str, overrides: list[str], init: str, seed: int, reference: str | None) -> list[str]:
        over = list(overrides) + [f"train.max_steps={self.mid_steps}", f"train.init_from={init}", f"run.seed={seed}"]
        if method.startswith("remit"):  # every checkpoint kept: the mechanism is measured on each
            over += [f"train.save_interval={self.mechanism_interval}", f"train.keep_checkpoints={self.mid_steps}"]
        else:
            over += [f"train.save_interval={max(self.mid_steps // 2, 1)}"]
        if reference:
            over.append(f"reference.checkpoint={reference}")
        if method.startswith("rmt"):
            over += self.rmt_sizes
        return over
