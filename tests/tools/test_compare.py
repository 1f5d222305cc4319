"""``lightning-nexus compare`` on two short real runs (TensorBoard logs written by real fits)."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.image import imread
from torch.utils.data import DataLoader

from lightning_nexus import NexusCallback
from lightning_nexus.monitor import GradSimilarityMonitor
from lightning_nexus.tools.cli import main as cli_main
from lightning_nexus.tools.compare import compare, load_runs

SOURCES = ["a", "b", "ood"]


class TwoSources(pl.LightningModule):
    """Regression on two train sources and one held-out source, logging the recipe dashboard's tags."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        self.lr = lr
        self.val = {}

    def loss(self, batch):
        target = batch["x"][:, :3].sum(1, keepdim=True) * (1.0 + 0.5 * batch["source_id"][:, None].float())
        return torch.nn.functional.mse_loss(self.net(batch["x"]), target)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train/loss", loss)
        self.log(f"train/loss/{SOURCES[int(batch['source_id'][0])]}", loss)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.val[dataloader_idx] = self.loss(batch)

    def on_validation_epoch_end(self):
        for i, name in enumerate(SOURCES):
            self.log(f"val/loss/{name}", self.val[i])
        self.log("val/loss", (self.val[0] + self.val[1]) / 2)
        self.log("val/loss/ood", self.val[2])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def batches(n, sources, seed):
    gen = torch.Generator().manual_seed(seed)
    return [
        {"x": torch.randn(16, 8, generator=gen), "source_id": torch.full((16,), sources[i % len(sources)])}
        for i in range(n)
    ]


def train(root, name, lr, nexus):
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=30,
        accumulate_grad_batches=2,
        val_check_interval=10,
        log_every_n_steps=2,
        logger=TensorBoardLogger(root, name=name, default_hp_metric=False),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[GradSimilarityMonitor()] + ([NexusCallback(inner_lr=0.05)] if nexus else []),
    )
    val = [DataLoader(batches(1, [s], 100 + s), batch_size=None) for s in range(3)]
    trainer.fit(TwoSources(lr), DataLoader(batches(60, [0, 1], 0), batch_size=None), val)
    return root / name


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return train(root, "nexus", 0.02, True), train(root, "plain", 0.005, False)


def test_compare_two_real_runs_table_matched_rows_and_plots(two_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert compare([str(p) for p in two_runs], out) == 0
    printed = capsys.readouterr().out
    matched = [line for line in printed.splitlines() if line.startswith("@ train loss")]
    assert any("val/loss/ood" in line for line in matched) and any("step reached" in line for line in matched)
    ood_row = next(line for line in matched if "val/loss/ood" in line)
    assert ood_row.split()[-2:] != ["n/a", "n/a"]
    assert "val/loss/a (final)" in printed and "train loss (best, smoothed)" in printed

    runs, problems = load_runs([str(p) for p in two_runs])
    assert not problems
    nexus_loss, plain_loss = ([v for _, v in r.series("train/loss")] for r in runs)
    assert not np.allclose(nexus_loss, plain_loss)  # the two runs really differ
    for name in ("loss_curves.png", "ood_vs_train.png", "grad_cosine.png"):
        image = imread(out / name)
        assert image.shape[0] >= 200 and image.shape[1] >= 300, name
        rgb = (image[..., :3] * 255).round()
        for color in ((31, 119, 180), (255, 127, 14)):  # matplotlib C0, C1: one line per run
            assert (np.abs(rgb - color).sum(-1) < 30).sum() > 20, (name, color)
    report = (out / "report.md").read_text()
    assert "@ train loss" in report and "![" in report and "grad_cosine.png" in report


def test_bad_run_dirs_are_named_and_the_others_still_reported(two_runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:  # through the console script's routing
        cli_main(["compare", str(two_runs[0]), str(empty), str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert f"{empty}: no TensorBoard event files" in captured.err
    assert f"{tmp_path / 'missing'}: not a directory" in captured.err
    assert "train loss (final, smoothed)" in captured.out
    assert "Not compared" in (tmp_path / "o" / "report.md").read_text()

    assert compare([str(empty)], tmp_path / "o2") == 2
    assert "no run could be read" in capsys.readouterr().err
