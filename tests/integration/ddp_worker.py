"""Run by test_ddp.py as a script: Lightning's popen launcher re-executes this file for rank 1.

Each rank trains BoringModel on its own slice (rank r gets batches r, r+2, ...) and saves its final
parameters to OUT/rank{r}.pt.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_nexus import NexusCallback, NexusDDPStrategy
from tests.helpers import boring_batches, make_boring


def main(out: str, sync: str, strategy_name: str, inner_lr: float, K: int, n: int) -> None:
    batches = boring_batches(n=n)
    strategy = NexusDDPStrategy(sync=sync) if strategy_name == "nexus" else "ddp"
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, accumulate_grad_batches=K,
        callbacks=[NexusCallback(inner_lr=inner_lr)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    module = make_boring()
    rank_batches = batches[trainer.global_rank :: 2]
    trainer.fit(module, train_dataloaders=DataLoader(rank_batches, batch_size=None))
    torch.save([p.detach() for p in module.parameters()], Path(out) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    out, sync, strategy_name, inner_lr, K, n = sys.argv[1:7]
    main(out, sync, strategy_name, float(inner_lr), int(K), int(n))
