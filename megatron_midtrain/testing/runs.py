"""Run the real trainer in-process on every rank (used by the multi-process tests)."""

from __future__ import annotations

import functools
from contextlib import contextmanager

#: Small, fast settings for tests: 1024-token global batch (8 x 128), no periodic eval.
TEST_OVERRIDES = [
    "train.global_batch_tokens=1024",
    "train.micro_batch_size=2",
    "train.eval_interval=0",
    "train.log_interval=100",
    "run.plot=false",
]


def with_test_defaults(overrides: list[str]) -> list[str]:
    """TEST_OVERRIDES + ``overrides``; the method is NTP unless the overrides choose one."""
    chosen = any(o.startswith("method=") for o in overrides)
    return TEST_OVERRIDES + ([] if chosen else ["method=ntp"]) + list(overrides)


def train_and_report(overrides: list[str], keep_distributed: bool = False, callbacks=None,
                     fixed_rollouts: bool = False, catch_user_error: bool = False) -> dict:
    """Train with ``overrides`` (and extra ``callbacks``; RL methods on
    :func:`~megatron_midtrain.testing.rollouts.fixed_rollouts` if asked); return rank 0's
    per-step records (other ranks return {}). With ``catch_user_error`` a UserError that stops
    training is caught and every rank's result holds its text as ``error`` (None if none)."""
    import torch.distributed as dist

    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.errors import UserError
    from megatron_midtrain.training.metrics import read_metrics
    from megatron_midtrain.training.trainer import Trainer

    cfg = load_config(with_test_defaults(overrides))
    trainer = Trainer(cfg, callbacks=callbacks)
    if fixed_rollouts and getattr(trainer.method, "is_rl", False):
        from megatron_midtrain.testing.rollouts import use_fixed_rollouts

        use_fixed_rollouts(trainer)
    out = {}
    try:
        trainer.train()
    except UserError as err:
        if not catch_user_error:
            raise
        out["error"] = str(err)
    finally:
        rank0 = dist.get_rank() == 0
        trainer.close(keep_distributed=keep_distributed)
    if catch_user_error:
        out.setdefault("error", None)
    if rank0:
        out.update(records=read_metrics(cfg.run.dir), run_dir=cfg.run.dir)
    return out


def validation_loss(overrides: list[str]) -> float:
    """Build (and resume) a trainer from ``overrides`` and return the validation loss."""
    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.training.trainer import Trainer

    from megatron_midtrain.callbacks.validation import validation_loss

    cfg = load_config(with_test_defaults(overrides))
    trainer = Trainer(cfg)
    try:
        return validation_loss(trainer)
    finally:
        trainer.close()


def save_initial_checkpoint(overrides: list[str], keep_distributed: bool = False) -> str:
    """Build the trainer (seeded init, no step taken) and save it as step 0; return its path."""
    import os

    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.training.trainer import Trainer

    cfg = load_config(with_test_defaults(overrides))
    trainer = Trainer(cfg)
    try:
        trainer.save()
    finally:
        trainer.close(keep_distributed=keep_distributed)
    return os.path.join(cfg.run.dir, "checkpoints", "iter_0000000")


def train_and_capture(overrides: list[str], capture_steps=(1, 3), grads_file: str | None = None,
                      keep_distributed: bool = False, nudge_weights: bool = False, moment_defect: bool = False) -> dict:
    """Train with ``overrides`` and, right after each step in ``capture_steps``, gather every
    parameter's gradient to full tensors (:func:`megatron_midtrain.testing.grads.full_gradients`).

    RL methods take :func:`megatron_midtrain.testing.rollouts.fixed_rollouts`. With
    ``nudge_weights`` every initial weight first moves by one ulp
    (:class:`~megatron_midtrain.testing.callbacks.NudgeWeights`: the rounding control); with
    ``moment_defect`` TP rank 1's Adam first moments are scaled by 0.99 after step 1
    (:class:`~megatron_midtrain.testing.callbacks.ScaleAdamMoments`: a defect the tests must see). Rank 0 saves
    ``{step: FullGradients}`` to ``grads_file`` (default ``<run.dir>/grads.pt``) and returns
    ``{"records": per-step metrics, "grads": that path}``; other ranks return {}.
    """
    import os

    import torch

    from megatron_midtrain.testing.callbacks import CaptureGradients, NudgeWeights, ScaleAdamMoments

    capture = CaptureGradients(capture_steps)
    callbacks = ([NudgeWeights()] if nudge_weights else []) + ([ScaleAdamMoments()] if moment_defect else []) + [capture]
    out = train_and_report(overrides, keep_distributed, callbacks=callbacks, fixed_rollouts=True)
    if not out:
        return {}
    path = grads_file or os.path.join(out["run_dir"], "grads.pt")
    torch.save(capture.captured, path)
    return {"records": out["records"], "grads": path}


@contextmanager
def float64_parameters():
    """Within the block, trainers build fp64 models (parameters, gradients, Adam state, losses).

    Test-only (no config key selects it): the fp64 parity cells use it to tell a layout bug
    from fp32 rounding. The trainer's ``param_dtype`` is replaced, and megatron's CPU
    gradient-norm helper, which returns an fp32 norm, computes in fp64 (else gradient clipping
    would scale every fp64 gradient by an fp32-rounded, layout-dependent coefficient).
    """
    import torch
    from megatron.core.optimizer import clip_grads

    from megatron_midtrain.training import trainer

    def l2_norm_fp64(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
        norms = [torch.linalg.vector_norm(t.double()) for ts in tensor_lists for t in ts]
        total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), dtype=torch.float64)
        return total.reshape(1), None

    saved = trainer.param_dtype, clip_grads.l2_norm_impl
    trainer.param_dtype = lambda cfg: torch.float64
    clip_grads.l2_norm_impl = l2_norm_fp64
    try:
        yield
    finally:
        trainer.param_dtype, clip_grads.l2_norm_impl = saved


def train_and_capture_fp64(overrides: list[str], capture_steps=(1, 3), grads_file: str | None = None,
                           keep_distributed: bool = False) -> dict:
    """:func:`train_and_capture` with an fp64 model (:func:`float64_parameters`)."""
    with float64_parameters():
        return train_and_capture(overrides, capture_steps, grads_file, keep_distributed)


#: capture_nudged: the parity tests' rounding control; capture_moment_defect: a defect they must see.
JOBS = {"train": train_and_report, "save_initial": save_initial_checkpoint, "capture": train_and_capture,
        "capture_fp64": train_and_capture_fp64,
        "capture_nudged": functools.partial(train_and_capture, nudge_weights=True),
        "capture_moment_defect": functools.partial(train_and_capture, moment_defect=True)}


def run_jobs(jobs: list[tuple[str, list[str]]]) -> list:
    """Run several jobs (``(kind, overrides)``, ``kind`` a key of :data:`JOBS`) one after the other in this
    process, reusing one set of process groups (all jobs must share the TP/PP layout).

    Spawning and importing megatron costs seconds per rank on a small CPU machine; tests that
    compare several runs of one layout use this to pay it once.
    """
    out = []
    for i, (kind, overrides) in enumerate(jobs):
        out.append(JOBS[kind](overrides, keep_distributed=i < len(jobs) - 1))
    return out
