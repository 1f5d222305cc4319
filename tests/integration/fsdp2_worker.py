"""Run by test_fsdp2.py: BoringModel-like MLP sharded with FSDP2 (ModelParallelStrategy) on 2 CPU ranks.

Each rank trains on its own slice (rank r gets batches r, r+2, ...) and saves the gathered full
parameters to OUT/rank{r}.pt.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader

from lightning_nexus import NexusCallback
from tests.helpers import boring_batches, make_mlp


class ShardedMLP(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = make_mlp()

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.net(batch), torch.ones(batch.shape[0], 2))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(out: str, inner_lr: float, K: int, n: int) -> None:
    batches = boring_batches(n=n)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=1, accumulate_grad_batches=K, callbacks=[NexusCallback(inner_lr=inner_lr)], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, use_distributed_sampler=False,
    )
    module = ShardedMLP()
    trainer.fit(module, train_dataloaders=DataLoader(batches[trainer.global_rank :: 2], batch_size=None))
    full = [p.full_tensor().detach() for p in module.parameters()]
    torch.save(full, Path(out) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    out, inner_lr, K, n = sys.argv[1:5]
    main(out, float(inner_lr), int(K), int(n))
