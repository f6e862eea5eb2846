"""Weights & Biases logging of the per-step metrics records (``run.wandb.*``).

Why a callback and not part of MetricsWriter: W&B is optional (``pip install -e ".[wandb]"``),
talks to a server and keeps its own process; metrics.jsonl stays the source of truth and
this only mirrors it. Only global rank 0 talks to W&B.

Resuming: the W&B run id is kept in ``<run_dir>/wandb_id.txt`` (written atomically on the
first start), and every later start of the same run directory passes ``id=<that id>,
resume="allow"``, so a run split across SLURM allocations or restarted after a crash stays
one W&B run. W&B keeps a run's step monotonic: steps re-run after resuming from an older
checkpoint than the last logged step are dropped by W&B (with a warning), not duplicated.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import secrets
import string

from omegaconf import OmegaConf

from megatron_midtrain.callbacks.base import Callback
from megatron_midtrain.errors import UserError

ID_FILE = "wandb_id.txt"


def new_run_id() -> str:
    """8 random [a-z0-9] characters, W&B's own id format (wandb.util.generate_id is gone in 0.31)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise UserError("run.wandb.project is set but wandb is not installed",
                        'pip install -e ".[wandb]" (or clear run.wandb.project)') from None
    return wandb


def read_or_create_run_id(run_dir: str, new_id=new_run_id) -> str:
    """The W&B run id of this run directory; ``new_id()`` makes (and stores) one the first time."""
    path = os.path.join(run_dir, ID_FILE)
    if os.path.exists(path):
        with open(path) as fh:
            run_id = fh.read().strip()
        if run_id:
            return run_id
    run_id = new_id()
    os.makedirs(run_dir, exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        fh.write(run_id + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(path + ".tmp", path)
    return run_id


class WandbLogger(Callback):
    """Mirror every step's metrics record to a W&B run (rank 0 only); one W&B run per run dir.

    The import happens here, at construction (before any training), so a missing package is a
    one-line :class:`UserError` and not a failure after the model was built.
    """

    def __init__(self, cfg):
        """``cfg``: the whole :class:`~megatron_midtrain.config.schema.MidtrainConfig` (logged as the W&B config)."""
        self.cfg = cfg
        self.wcfg = cfg.run.wandb
        self.wandb = _import_wandb()
        self.run = None
        self._started = False

    @classmethod
    def from_config(cls, cfg) -> "WandbLogger | None":
        """None when ``run.wandb.project`` is empty (W&B off)."""
        return cls(cfg) if cfg.run.wandb.project else None

    def on_train_start(self, trainer) -> None:
        if not trainer.rank0 or self.run is not None:
            return
        w = self.wcfg
        run_id = read_or_create_run_id(trainer.run_dir)
        wandb_dir = w.dir or trainer.run_dir
        os.makedirs(wandb_dir, exist_ok=True)
        cfg = trainer.cfg
        config = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else OmegaConf.to_container(cfg, resolve=True)
        self.run = self.wandb.init(
            project=w.project, entity=w.entity, name=w.name or cfg.run.name, group=w.group,
            tags=list(w.tags) or None, mode=w.mode, dir=wandb_dir, config=config, id=run_id, resume="allow",
        )
        self._started = True

    def on_step_end(self, trainer, record: dict) -> None:
        if self.run is None:
            return
        values = {k: v for k, v in record.items()
                  if k != "step" and isinstance(v, numbers.Real) and math.isfinite(v)}
        self.run.log(values, step=int(record["step"]))

    def _finish(self, exit_code: int) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=exit_code)

    def on_train_end(self, trainer) -> None:
        self._finish(0)

    def close(self, trainer) -> None:
        """Still open here means training failed (on_train_end did not run): mark the W&B run failed.

        ``wandb.teardown()`` then waits for the W&B service process: ``finish()`` can return
        before the offline ``.wandb`` log is flushed (seen with wandb 0.31).
        """
        self._finish(1)
        if self._started:
            self._started = False
            self.wandb.teardown()
