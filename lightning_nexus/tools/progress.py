"""The ``lightning-nexus`` progress bar: outer steps against ``max_steps``, and a quiet log when not a terminal.

Lightning's bar counts micro-batches (``batch_idx``), so with ``accumulate_grad_batches=K`` it shows
``209/?`` or ``80/20`` against ``max_steps``. This one counts optimizer steps. Written to a file or a
pipe (no TTY), tqdm's redraws and one bar per validation loader and batch become hundreds of lines;
there it prints one line every 5 % of training and one line per validation instead.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from typing_extensions import override

from lightning_nexus._compat import trainer_callbacks, trainer_log_every_n_steps


class StepProgressBar(TQDMProgressBar):
    """A TQDM bar over outer steps; on a non-TTY stream, plain lines.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> trainer = Trainer(max_steps=4, accumulate_grad_batches=2, callbacks=[StepProgressBar(interactive=False)],
        ...                   logger=False, enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0)
        >>> trainer.fit(BoringModel())  # doctest: +ELLIPSIS
        step 1/4 ...
    """

    def __init__(self, refresh_rate: int = 1, interactive: bool | None = None) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._every = 1
        self._t0 = 0.0

    @property
    @override
    def total_train_batches(self) -> int | float:
        if self.trainer.max_steps > 0:
            return self.trainer.max_steps
        return super().total_train_batches

    @property
    @override
    def is_disabled(self) -> bool:  # the bars; the plain lines of a non-TTY log are printed regardless
        return super().is_disabled or not self.interactive

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        total = self.total_train_batches
        self._every = max(1, int(total) // 20) if total != float("inf") else max(1, trainer_log_every_n_steps(trainer))
        self._t0 = time.monotonic()

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        if trainer.max_steps > 0:  # a resumed run starts where it left off
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.refresh()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.max_steps <= 0:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar = self.train_progress_bar
        step = trainer.global_step
        if step == bar.n:
            return  # a micro-batch inside a window: no outer step yet
        bar.n = step
        if self.interactive:
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()
        elif trainer.is_global_zero and (step % self._every == 0 or step == trainer.max_steps):
            print(f"step {step}/{trainer.max_steps}  {self._metrics_text(trainer, 'train/')}  "
                  f"{time.monotonic() - self._t0:.0f}s", flush=True)  # fmt: skip

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self.interactive and not trainer.sanity_checking and trainer.is_global_zero:
            print(f"validation at step {trainer.global_step}: {self._metrics_text(trainer, 'val/')}", flush=True)

    @staticmethod
    def _metrics_text(trainer: pl.Trainer, prefix: str) -> str:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix) and v.numel() == 1}
        shown = [k for k in metrics if k.count("/") == 1] or list(metrics)[:4]  # the means, not every source
        return "  ".join(f"{k} {metrics[k]:.4f}" for k in shown)


def use_step_progress_bar(trainer: pl.Trainer) -> None:
    """Swap the Trainer's progress bar (Lightning's default: TQDM, or Rich where rich is installed) for
    :class:`StepProgressBar`. Call it only when the user configured no bar of their own."""
    callbacks = trainer_callbacks(trainer)
    for i, callback in enumerate(callbacks):
        if isinstance(callback, ProgressBar):
            callbacks[i] = StepProgressBar()
            return
