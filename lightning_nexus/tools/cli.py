"""``lightning-nexus``: LightningCLI for any LightningModule/DataModule, plus the end-of-run loss table.

``lightning-nexus fit --config recipes/quickstart.yaml`` (or ``python -m lightning_nexus fit ...``).
The model and data are named by ``class_path`` in the YAML, so this module never imports the recipes.
``NexusCallback`` and the Nexus strategies are given the same way (``trainer.callbacks`` /
``trainer.strategy``); ``strategy: nexus_ddp`` works by name once ``lightning_nexus`` is imported.

Model and data are linked by the module itself rather than with ``parser.link_arguments``: jsonargparse
rejects a link whose target parameter the chosen class lacks, which would make this CLI unusable for
modules without a ``vocab_size`` argument. ``lightning_nexus_recipes.CausalLMModule`` reads ``vocab_size`` from the
datamodule in ``setup`` and checks ``data.block_size`` against its context length there.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_nexus.strategies  # noqa: F401  (registers the "nexus_ddp" strategy names)


class NexusCLI(LightningCLI):
    """LightningCLI with subclass mode for model and data, config checks and a final loss table.

    Example::

        >>> import sys
        >>> from lightning_nexus.tools.cli import NexusCLI
        >>> cli = NexusCLI(args=["--model", "lightning.pytorch.demos.boring_classes.BoringModel",
        ...                      "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"], run=False)
        >>> type(cli.model).__name__
        'BoringModel'
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        model_class = kwargs.pop("model_class", LightningModule)
        # None (not LightningDataModule): LightningCLI then makes `data` optional, so modules that bring
        # their own dataloaders run too
        datamodule_class = kwargs.pop("datamodule_class", None)
        super().__init__(model_class, datamodule_class, *args, **kwargs)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        _check_accelerator(config.trainer)

    def after_fit(self) -> None:
        print_loss_table(self.trainer)

    def after_validate(self) -> None:
        print_loss_table(self.trainer, prefix="val")

    def after_test(self) -> None:
        print_loss_table(self.trainer, prefix="test")


def _check_accelerator(trainer_cfg: Any) -> None:
    """GPU recipes on a machine without CUDA: one sentence naming the keys, not a traceback."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        strategy = trainer_cfg.get("strategy")
        name = strategy.get("class_path") if hasattr(strategy, "get") else strategy
        raise SystemExit(
            f"error: trainer.accelerator={accelerator!r} (strategy {name!r}) but no CUDA GPU is available. "
            "This recipe targets GPUs; on CPU run recipes/quickstart.yaml, or override "
            "--trainer.accelerator cpu --trainer.strategy auto --trainer.precision 32-true"
        )


def print_loss_table(trainer: Trainer, prefix: str = "val") -> None:
    """Per-source and OOD loss from the last evaluation, and where the TensorBoard logs are (rank 0)."""
    if trainer.global_rank != 0:
        return
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{prefix}/loss")}
    lines = []
    if metrics:
        ood = metrics.pop(f"{prefix}/loss/ood", None)
        mean = metrics.pop(f"{prefix}/loss", None)
        width = max([len("in-dist mean")] + [len(k) - len(prefix) - 6 for k in metrics])
        lines += [f"\n{prefix} loss after step {trainer.global_step}", f"  {'source':<{width}}  loss"]
        lines += [f"  {k[len(prefix) + 6 :]:<{width}}  {v:.4f}" for k, v in metrics.items()]
        if mean is not None:
            lines.append(f"  {'in-dist mean':<{width}}  {mean:.4f}")
        if ood is not None:
            lines.append(f"  {'OOD mean':<{width}}  {ood:.4f}")
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            lines.append(f"TensorBoard logs: {logger.log_dir}  (view: tensorboard --logdir {logger.root_dir})")
    if lines:
        print("\n".join(lines), flush=True)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-nexus`` console script (``fit``/``validate``/``test``/..., ``compare`` or ``experiment``)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["compare"]:  # reads finished runs: no Trainer, so routed before LightningCLI parses
        from lightning_nexus.tools.compare import main as compare_main

        compare_main(argv[1:])
        return
    if argv[:1] == ["experiment"]:  # runs many fits as child processes: not a LightningCLI subcommand
        from lightning_nexus.tools.experiment import main as experiment_main

        experiment_main(argv[1:])
        return
    NexusCLI(args=args)
    # Lightning leaves the process group alive after fit; without this, gloo/DCP threads can abort the
    # process at interpreter exit ("terminate called without an active exception") after a good run.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
