"""Run by test_ddp.py as a script: Lightning's popen launcher re-executes this file for rank 1.

Each rank trains a model on its own slice (rank r gets batches r, r+2, ...) and saves its final
parameters and global step to OUT/{phase}_rank{r}.pt. Phase "save" also writes OUT/mid.ckpt at local batch 4
(mid-window for K=3) and the window's anchor to OUT/anchor{r}.pt; phase "resume" starts from mid.ckpt.

Optional arguments: the model ("boring"; "inf_rank1": BoringModel whose loss is inf on rank 1 only at
local batch 4; "batchnorm": an MLP with BatchNorm) and the precision ("32", or "16-scaler": 16-mixed with
an explicit CPU GradScaler). The result also holds, per window, the loss scale, parameters and buffers
after the outer step, and the callback's window counters.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

from lightning_nexus import NexusCallback, NexusDDPStrategy
from tests.helpers import boring_batches, make_boring


class _SaveMidWindow(pl.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 3:
            torch.save(
                [p.detach().clone() for p in pl_module.parameters()], self.out / f"anchor{trainer.global_rank}.pt"
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 4:
            trainer.save_checkpoint(self.out / "mid.ckpt")


class _InfOnRank1(BoringModel):
    def __init__(self):
        torch.manual_seed(0)  # the same weights on both ranks, as make_boring
        super().__init__()

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.global_rank == 1 and batch_idx == 4:
            out["loss"] = out["loss"] * float("inf")
        return out


class _BatchNormNet(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(32, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(), torch.nn.Linear(16, 2)
        )

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.net(batch), torch.ones(batch.shape[0], 2))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _RecordWindows(pl.Callback):
    """State after each outer step (batch end of the window's last micro-batch)."""

    def __init__(self, K: int):
        self.K, self.scales, self.params, self.buffers = K, [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx % self.K == self.K - 1:
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            self.scales.append(scaler.get_scale() if scaler is not None else None)
            self.params.append([p.detach().clone() for p in pl_module.parameters()])
            self.buffers.append([b.detach().clone() for b in pl_module.buffers()])


def main(
    out: str,
    sync: str,
    strategy_name: str,
    inner_lr: float,
    K: int,
    n: int,
    phase: str,
    model: str = "boring",
    precision: str = "32",
) -> None:
    batches = boring_batches(n=n, batch_size=4 if model == "batchnorm" else 2)
    strategy = NexusDDPStrategy(sync=sync) if strategy_name == "nexus" else "ddp"
    plugins = []
    if precision == "16-scaler":  # on CPU, precision="16-mixed" alone would run without a scaler
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    nexus, recorder = NexusCallback(inner_lr=inner_lr), _RecordWindows(K)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=1,
        accumulate_grad_batches=K,
        callbacks=[nexus, recorder] + ([_SaveMidWindow(Path(out))] if phase == "save" else []),
        plugins=plugins,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    module = {"boring": make_boring, "inf_rank1": _InfOnRank1, "batchnorm": _BatchNormNet}[model]()
    rank_batches = batches[trainer.global_rank :: 2]
    ckpt = Path(out) / "mid.ckpt" if phase == "resume" else None
    trainer.fit(module, train_dataloaders=DataLoader(rank_batches, batch_size=None), ckpt_path=ckpt)
    result = {
        "params": [p.detach() for p in module.parameters()],
        "buffers": [b.detach() for b in module.buffers()],
        "global_step": trainer.global_step,
        "skipped_windows": nexus.skipped_windows,
        "completed_windows": nexus.completed_windows,
        "window_scales": recorder.scales,
        "window_params": recorder.params,
        "window_buffers": recorder.buffers,
    }
    torch.save(result, Path(out) / f"{phase}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    out, sync, strategy_name, inner_lr, K, n, phase = sys.argv[1:8]
    main(out, sync, strategy_name, float(inner_lr), int(K), int(n), phase, *sys.argv[8:10])
    # Lightning keeps the process group alive after fit; tearing it down before exit avoids an abort
    # ("terminate called without an active exception") from gloo/DCP threads at interpreter shutdown.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
