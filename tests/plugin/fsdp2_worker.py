"""Run by test_fsdp2.py: BoringModel-like MLP sharded with FSDP2 (ModelParallelStrategy) on 2 CPU ranks.

Each rank trains on its own slice (rank r gets batches r, r+2, ...) and saves the gathered full
parameters and global step to OUT/{phase}_rank{r}.pt. Phase "save" also writes OUT/mid.ckpt at local
batch 4 (mid-window for K=3; sharded or full checkpoint) and the window's gathered anchor to
OUT/anchor.pt; phase "resume" starts from OUT/mid.ckpt.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from lightning_nexus import NexusCallback
from tests.helpers import MLPModule, boring_batches, shard_mlp


class ShardedMLP(MLPModule):
    """MLPModule (the single-process reference's module), sharded with FSDP2."""

    def configure_model(self):
        shard_mlp(self.net, self.device_mesh["data_parallel"])


class _SaveMidWindow(pl.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 3:  # every rank joins the gathers
            anchor = [p.full_tensor().detach().clone() for p in pl_module.parameters()]
            if trainer.global_rank == 0:
                torch.save(anchor, self.out / "anchor.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 4:
            trainer.save_checkpoint(self.out / "mid.ckpt")


def main(out: str, inner_lr: float, K: int, n: int, phase: str, checkpoint: str) -> None:
    batches = boring_batches(n=n)
    strategy = ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=checkpoint == "sharded"
    )
    callbacks = [NexusCallback(inner_lr=inner_lr)] + ([_SaveMidWindow(Path(out))] if phase == "save" else [])
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=1,
        accumulate_grad_batches=K,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    module = ShardedMLP()
    ckpt = Path(out) / "mid.ckpt" if phase == "resume" else None
    trainer.fit(
        module, train_dataloaders=DataLoader(batches[trainer.global_rank :: 2], batch_size=None), ckpt_path=ckpt
    )
    full = [p.full_tensor().detach() for p in module.parameters()]
    torch.save(
        {"params": full, "global_step": trainer.global_step}, Path(out) / f"{phase}_rank{trainer.global_rank}.pt"
    )


if __name__ == "__main__":
    out, inner_lr, K, n, phase, checkpoint = sys.argv[1:7]
    main(out, float(inner_lr), int(K), int(n), phase, checkpoint)
    # Lightning keeps the process group alive after fit; tearing it down before exit avoids an abort
    # ("terminate called without an active exception") from gloo/DCP threads at interpreter shutdown.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
