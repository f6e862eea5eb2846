"""The run's metrics: ``metrics.jsonl`` (+ TensorBoard) on rank 0, and the progress line."""

from __future__ import annotations

from megatron_midtrain.callbacks.base import Callback
from megatron_midtrain.training.metrics import MetricsWriter, Progress, plot_metrics
from megatron_midtrain.training.runtime import log0


class MetricsFile(Callback):
    """One JSON object per step in ``<run dir>/metrics.jsonl`` (and TensorBoard scalars with
    ``run.tensorboard``). On resume the file is cut back to the resumed step first, under the
    run dir's lock (``trainer.run_lock``, which the writer checks)."""

    def __init__(self, tensorboard: bool):
        self.tensorboard = tensorboard
        self.writer = None

    def on_train_start(self, trainer) -> None:
        if trainer.rank0 and self.writer is None:
            self.writer = MetricsWriter(trainer.run_dir, trainer.step, self.tensorboard, lock=trainer.run_lock)

    def on_step_end(self, trainer, record: dict) -> None:
        if self.writer is not None:
            self.writer.write(record)

    def close(self, trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class ProgressLog(Callback):
    """Prints step, loss, lr, grad norm, tokens/s and ETA every ``interval`` steps (and at the first and last)."""

    def __init__(self, interval: int, max_steps: int):
        self.interval = max(1, interval)
        self.max_steps = max_steps
        self.progress = None

    def on_train_start(self, trainer) -> None:
        self.progress = Progress(self.max_steps, trainer.step)

    def on_step_end(self, trainer, record: dict) -> None:
        step = record["step"]
        if step % self.interval == 0 or step == self.max_steps or step == 1:
            line = self.progress.line(record)
            if "val/loss" in record:
                line += f" | val_loss {record['val/loss']:.4f}"
            log0(line)


class MetricsPlot(Callback):
    """Redraws ``<run dir>/metrics.png`` from metrics.jsonl after every checkpoint (rank 0)."""

    def on_save(self, trainer) -> None:
        if trainer.rank0:
            plot_metrics(trainer.run_dir)
