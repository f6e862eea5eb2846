"""What the flywheel measures on one checkpoint: per-token scores of held-out text and the greedy
held-out arithmetic accuracy.

* :func:`probe_tokens` scores the validation split of one demo domain (prose or arithmetic,
  documents never trained on) with the checkpoint: per position the target log-prob, the
  predictive entropy and whether the greedy (argmax) token is the target. It runs megatron's
  forward-only pass (:func:`~megatron_midtrain.training.forward.forward_only`) inside an
  ordinary Trainer built with ``train.init_from=<checkpoint>``, so the batches are exactly the
  validation batches a run sees; they depend only on the seed and the domain, not on the model,
  which makes per-position comparisons across checkpoints (entropy buckets of the base model,
  ReMiT weights against the reference) line up.
* :func:`heldout_accuracy` is the GRPO method's own greedy exact-match evaluation on the demo's
  held-out problems (``math_eval.jsonl``: never in the training corpus).
"""

from __future__ import annotations

import os

import numpy as np
import torch

#: The two demo domains and their ``data.demo_math_weight``.
DOMAINS = {"prose": 0.0, "math": 1.0}


def _scratch(workdir: str, what: str) -> list[str]:
    # Each probe builds a Trainer (which owns a run dir for its lock and config): a scratch one.
    return [f"run.dir={os.path.join(workdir, 'scratch', what)}", "train.save_interval=0", "run.plot=false"]


def _score(batch, logits):
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    labels = batch["labels"]
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    correct = (logp_all.argmax(-1) == labels).float()
    return torch.stack([logp, entropy, correct])


def probe_tokens(checkpoint: str, domain: str, eval_batches: int, workdir: str, common: list[str]) -> dict:
    """Per-position scores of ``eval_batches`` validation batches of ``domain`` under ``checkpoint``.

    Returns numpy arrays ``[rows, seq]``: ``tokens``, ``labels``, ``mask`` (loss mask), ``logp``,
    ``entropy``, ``correct``. World size 1 (the flywheel runs in one process)."""
    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.training.forward import forward_only
    from megatron_midtrain.training.trainer import Trainer

    cfg = load_config(common + ["method=ntp", f"data.demo_math_weight={DOMAINS[domain]}", f"train.init_from={checkpoint}",
                                f"train.eval_batches={eval_batches}"] + _scratch(workdir, f"probe-{domain}"))
    trainer = Trainer(cfg)
    out = {k: [] for k in ("tokens", "labels", "mask", "logp", "entropy", "correct")}
    try:
        trainer.model.eval()
        batches = trainer.valid_batches
        with torch.no_grad():
            for i in range(eval_batches):
                scores = forward_only(trainer.model, batches.iterator(i), batches.num_microbatches, _score,
                                      seq_length=cfg.data.seq_length, micro_batch_size=cfg.train.micro_batch_size,
                                      device=trainer.device)
                for batch, s in zip(batches.iterator(i), scores):
                    out["tokens"].append(batch["tokens"].numpy())
                    out["labels"].append(batch["labels"].numpy())
                    out["mask"].append(batch["loss_mask"].numpy() > 0)
                    for j, key in enumerate(("logp", "entropy", "correct")):
                        out[key].append(s[j].cpu().numpy())
    finally:
        trainer.close(keep_distributed=True)
    return {k: np.concatenate(v) for k, v in out.items()}


def heldout_accuracy(checkpoint: str, problems: int, workdir: str, common: list[str]) -> float:
    """Greedy exact-match accuracy of ``checkpoint`` on the first ``problems`` held-out problems."""
    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.training.trainer import Trainer

    cfg = load_config(common + ["experiment=grpo_demo", f"method.eval_problems={problems}", f"train.init_from={checkpoint}"]
                      + _scratch(workdir, "accuracy"))
    trainer = Trainer(cfg)
    try:
        return float(trainer.method_step.heldout_accuracy())
    finally:
        trainer.close(keep_distributed=True)


def token_metrics(probe: dict, base_entropy: np.ndarray) -> dict:
    """Validation loss and next-token accuracy (all positions, and per tercile of the *base*
    model's entropy at the same positions: the RMT paper's high-entropy measure)."""
    mask = probe["mask"]
    lo, hi = np.quantile(base_entropy[mask], [1 / 3, 2 / 3])
    high = mask & (base_entropy > hi)
    low = mask & (base_entropy <= lo)
    return {
        "val_loss": float(-probe["logp"][mask].mean()),
        "next_token_acc": float(probe["correct"][mask].mean()),
        "next_token_acc_high_entropy": float(probe["correct"][high].mean()),
        "next_token_acc_low_entropy": float(probe["correct"][low].mean()),
        "positions": int(mask.sum()),
        "high_entropy_positions": int(high.sum()),
    }
