"""``lightning-nexus fit`` writes and reads checkpoints through VerifiedCheckpointIO unless told otherwise."""

from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_nexus.checkpoint import VerifiedCheckpointIO
from lightning_nexus.tools.cli import NexusCLI

ARGS = ["--model", "lightning.pytorch.demos.boring_classes.BoringModel", "--trainer.logger", "false"]


def test_cli_uses_verified_checkpoints_by_default():
    cli = NexusCLI(args=ARGS, run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, VerifiedCheckpointIO)


def test_cli_keeps_a_checkpoint_io_the_config_names():
    class Custom(TorchCheckpointIO):
        pass

    cli = NexusCLI(args=ARGS, run=False, trainer_defaults={"plugins": [Custom()]})
    assert type(cli.trainer.strategy.checkpoint_io) is Custom
