"""Tiny modules the CLI tests name by class_path."""

from lightning.pytorch.demos.boring_classes import BoringModel


class ValLossModel(BoringModel):
    """BoringModel that logs ``train/loss`` and ``val/loss``, like the recipes' module."""

    def training_step(self, batch, batch_idx):
        loss = self.step(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.step(batch))
