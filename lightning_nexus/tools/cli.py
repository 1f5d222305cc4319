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

import difflib
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

import lightning_nexus.strategies  # noqa: F401  (registers the "nexus_ddp" strategy names)
from lightning_nexus._compat import trainer_callbacks
from lightning_nexus.checkpoint import VerifiedCheckpointIO
from lightning_nexus.tools.progress import use_step_progress_bar
from lightning_nexus.tools.recipes import resolve_config_args


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
        kwargs.setdefault("parser_class", _NexusArgumentParser)
        model_class = kwargs.pop("model_class", LightningModule)
        # None (not LightningDataModule): LightningCLI then makes `data` optional, so modules that bring
        # their own dataloaders run too
        datamodule_class = kwargs.pop("datamodule_class", None)
        super().__init__(model_class, datamodule_class, *args, **kwargs)

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        _check_accelerator(config.trainer)
        if self.subcommand == "fit":
            continue_log_version(config)

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # what the user configured, read from the parsed config: LightningCLI extends the instantiated
        # callback list in place with the Trainer's own defaults, so it cannot tell them apart
        config = self.config[self.subcommand] if self.subcommand else self.config
        specs = config["trainer"].get("callbacks") or []
        specs = specs if isinstance(specs, list) else [specs]
        if not any("ProgressBar" in str(getattr(spec, "class_path", spec)) for spec in specs):
            use_step_progress_bar(trainer)
        use_verified_checkpoints(trainer)
        return trainer

    def before_fit(self) -> None:
        self._validated = _ValidationRecorder()
        trainer_callbacks(self.trainer).append(self._validated)

    def after_fit(self) -> None:
        validate_last_step(self.trainer, self.model, self.datamodule, self._validated)
        print_loss_table(self.trainer)

    def after_validate(self) -> None:
        print_loss_table(self.trainer, prefix="val")

    def after_test(self) -> None:
        print_loss_table(self.trainer, prefix="test")


def use_verified_checkpoints(trainer: Trainer) -> None:
    """Atomic, verified checkpoint files (lightning_nexus.checkpoint) unless the config names its own CheckpointIO."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default
        trainer.strategy.checkpoint_io = VerifiedCheckpointIO()


class _NexusArgumentParser(LightningArgumentParser):
    """Turns jsonargparse's multi-line report of a mistyped ``model:``/``data:`` key into one line."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        line = unknown_key_message(message)
        if line is None or not self.exit_on_error:
            super().error(message, ex)
        sys.stderr.write(f"error: {line}\n")
        self.exit(2)


def unknown_key_message(message: str) -> str | None:
    """``'<key>' is not an option of <class>; did you mean '<nearest>'?`` for jsonargparse's report of an
    unknown init argument, or None if the message is about something else."""
    found = re.search(r"class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", message)
    if found is None:
        return None
    class_path, key = found.groups()
    section = re.match(r'Parser key "([\w.]+)"', message)
    where = section.group(1) if section else "init_args"
    try:
        valid = [
            n for n in inspect.signature(_import_dotted(class_path)).parameters if n not in ("self", "args", "kwargs")
        ]
    except (ImportError, AttributeError, TypeError, ValueError):
        valid = []
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(valid)}" if valid else ""
    return f"{where}: '{key}' is not an option of {class_path}{hint}"


def _import_dotted(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


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


class _ValidationRecorder(Callback):
    """Remembers the step of the last real (non-sanity) validation during fit."""

    def __init__(self) -> None:
        self.step: int | None = None

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


def validate_last_step(
    trainer: Trainer, model: LightningModule, datamodule: LightningDataModule | None, validated: _ValidationRecorder
) -> None:
    """One more validation when the run's last step was not validated, so every fit ends with the table.

    Skipped for runs that stopped early on an error, interrupted runs and runs without validation data.
    """
    if trainer.interrupted or validated.step == trainer.global_step or trainer.global_step == 0:
        return
    if trainer.limit_val_batches == 0 or not _has_validation(model, datamodule):
        return
    trainer.validate(model, datamodule=datamodule, verbose=False)


def _has_validation(model: LightningModule, datamodule: LightningDataModule | None) -> bool:
    source = datamodule if datamodule is not None else model
    return is_overridden("val_dataloader", source) and (
        datamodule is not None or is_overridden("validation_step", model)
    )


def continue_log_version(config: Any) -> None:
    """Resuming with ``--ckpt_path`` logs into the TensorBoard version the checkpoint came from.

    Only when the configured logger is a TensorBoardLogger that names no version and the checkpoint lies
    in ``<save_dir>/<name>/version_N/...``; ``--ckpt_path last`` takes the newest ``version_N`` holding a
    ``checkpoints/last.ckpt`` (without this, Lightning would look for ``last`` in a new, empty version).
    Otherwise Lightning's own choice (a new ``version_N``) stands.
    """
    ckpt = config.get("ckpt_path")
    logger = config.trainer.get("logger")
    if not ckpt or ckpt in ("best", "hpc", "registry") or not hasattr(logger, "get"):
        return
    if logger.get("class_path") not in ("lightning.pytorch.loggers.TensorBoardLogger", "TensorBoardLogger"):
        return
    args = logger.get("init_args")
    if args is None or args.get("version") is not None:
        return
    run_root = (Path(args.get("save_dir", ".")) / (args.get("name") or "lightning_logs")).resolve()
    if ckpt == "last":
        versions = [d for d in run_root.glob("version_*") if re.fullmatch(r"version_\d+", d.name)]
        with_last = [d for d in versions if (d / "checkpoints" / "last.ckpt").exists()]
        if with_last:
            args["version"] = max(with_last, key=lambda d: int(d.name.split("_")[1])).name
        return
    for parent in Path(ckpt).resolve().parents:
        if parent.parent == run_root and re.fullmatch(r"version_\d+", parent.name):
            args["version"] = parent.name
            return


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


TRAINER_COMMANDS = {
    "fit": "train a model (e.g. `lightning-nexus fit --config quickstart`)",
    "validate": "evaluate a checkpoint on the validation sources",
    "test": "evaluate a checkpoint on the test data",
    "predict": "run predictions with a checkpoint",
}
TOOL_COMMANDS = {
    "compare": ("lightning_nexus.tools.compare", "put finished runs side by side (curves, matched-loss table)"),
    "experiment": ("lightning_nexus.tools.experiment", "train every arm x seed of an experiment file, then report"),
    "recipes": ("lightning_nexus.tools.recipes", "list the packaged recipes and their target hardware"),
}


def usage() -> str:
    width = max(map(len, [*TRAINER_COMMANDS, *TOOL_COMMANDS]))
    lines = ["usage: lightning-nexus COMMAND [options]   (lightning-nexus COMMAND --help for a command's options)", ""]
    lines += [f"  {name:<{width}}  {text}" for name, text in TRAINER_COMMANDS.items()]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in TOOL_COMMANDS.items()]
    lines += ["", "--config takes a file or a packaged recipe name (see `lightning-nexus recipes`)."]
    return "\n".join(lines)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-nexus`` console script: the Trainer commands through LightningCLI,
    the tools (``compare``, ``experiment``, ``recipes``) routed before LightningCLI parses anything."""
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        if not argv:
            raise SystemExit(2)
        return
    command = argv[0]
    known = [*TRAINER_COMMANDS, *TOOL_COMMANDS]
    if command not in known:
        close = difflib.get_close_matches(command, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SystemExit(f"error: unknown command {command!r}{hint} Choose from: {', '.join(known)}.")
    argv = resolve_config_args(argv)
    if command in TOOL_COMMANDS:
        importlib.import_module(TOOL_COMMANDS[command][0]).main(argv[1:])
        return
    sys.argv = [sys.argv[0], *argv]  # LightningCLI reads sys.argv (passing args too makes it warn)
    try:
        NexusCLI()
    except Exception as err:
        # a bad data source arrives wrapped in a long parser traceback: print its one-line message instead
        cause = _source_error(err)
        if cause is None:
            raise
        raise SystemExit(f"error: {cause}") from None
    # Lightning leaves the process group alive after fit; without this, gloo/DCP threads can abort the
    # process at interpreter exit ("terminate called without an active exception") after a good run.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _source_error(err: BaseException | None) -> BaseException | None:
    """The ``SourceError`` behind ``err`` (through ``__cause__``/``__context__``), if any."""
    from lightning_nexus.data.errors import SourceError

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, SourceError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
