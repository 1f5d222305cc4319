"""Run by test_monitor_ddp.py as a script (Lightning's launcher re-executes it for rank 1).

Each rank trains a small MLP on its own slice of source-tagged batches (rank r gets batches r, r+2,
...) under ``STRATEGY`` with GradSimilarityMonitors in ``MODES`` (e.g. ``exact,sketch``) and saves, per logged window,
what they measured plus the full parameters every micro-batch's backward saw, to OUT/rank{r}.pt.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from lightning_nexus import NexusCallback, NexusDDPStrategy
from lightning_nexus.monitor import GradSimilarityMonitor
from tests.helpers import shard_mlp

K = 3
NAMES = ["alpha", "beta", "gamma"]


def batches(n: int) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    # both ranks see the same source at the same micro-batch, as MixedSourceDataModule guarantees
    return [{"x": torch.randn(4, 8, generator=gen), "source_id": torch.full((4,), (i // 2) % 3)} for i in range(n)]


def make_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def loss_fn(net: torch.nn.Module, batch: dict) -> torch.Tensor:
    target = torch.sin(batch["x"][:, :2] * (1.0 + batch["source_id"][:, None].float()))
    return torch.nn.functional.mse_loss(net(batch["x"]), target)


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def configure_model(self) -> None:
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            shard_mlp(self.net, self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        return loss_fn(self.net, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Data(pl.LightningDataModule):
    source_names = NAMES

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def train_dataloader(self):
        return DataLoader(batches(self.n)[self.trainer.global_rank :: 2], batch_size=None)


class Capture(pl.Callback):
    def __init__(self, monitors) -> None:
        self.monitors, self.params, self.windows = monitors, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in pl_module.parameters()]
        self.params.append([p.detach().clone() for p in full])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        last = [m.last for m in self.monitors]
        if last[0] is not None and (not self.windows or self.windows[-1][0]["step"] != last[0].step):
            self.windows.append(
                [
                    {"step": r.step, "labels": r.labels, "cosine": r.cosine, "norms": r.grad_norms, "pairs": r.pairs}
                    for r in last
                ]
            )


def main(out: str, strategy_name: str, nexus: bool, n: int, modes: list[str]) -> None:
    if strategy_name == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    elif strategy_name == "ddp":
        strategy = "ddp"
    else:
        strategy = NexusDDPStrategy(sync="every")
    monitors = [GradSimilarityMonitor(mode=mode, sketch_dim=64) for mode in modes]
    capture = Capture(monitors)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=1,
        accumulate_grad_batches=K,
        callbacks=[capture, *monitors] + ([NexusCallback(inner_lr=0.1)] if nexus else []),
        logger=False,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(Module(), datamodule=Data(n))
    torch.save({"params": capture.params, "windows": capture.windows}, Path(out) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    out, strategy_name, nexus, n, modes = sys.argv[1:6]
    main(out, strategy_name, nexus == "nexus", int(n), modes.split(","))
    # Lightning keeps the process group alive after fit; tearing it down before exit avoids an abort
    # ("terminate called without an active exception") from gloo/DCP threads at interpreter shutdown.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
