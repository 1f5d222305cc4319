"""Run by test_ddp.py as a script: Lightning's popen launcher re-executes this file for rank 1.

Each rank trains BoringModel on its own slice (rank r gets batches r, r+2, ...) and saves its final
parameters and global step to OUT/rank{r}.pt. Phase "save" also writes OUT/mid.ckpt at local batch 4
(mid-window for K=3) and the window's anchor to OUT/anchor{r}.pt; phase "resume" starts from mid.ckpt.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_nexus import NexusCallback, NexusDDPStrategy
from tests.helpers import boring_batches, make_boring


class _SaveMidWindow(pl.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 3:
            torch.save([p.detach().clone() for p in pl_module.parameters()], self.out / f"anchor{trainer.global_rank}.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 4:
            trainer.save_checkpoint(self.out / "mid.ckpt")


def main(out: str, sync: str, strategy_name: str, inner_lr: float, K: int, n: int, phase: str) -> None:
    batches = boring_batches(n=n)
    strategy = NexusDDPStrategy(sync=sync) if strategy_name == "nexus" else "ddp"
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, accumulate_grad_batches=K,
        callbacks=[NexusCallback(inner_lr=inner_lr)] + ([_SaveMidWindow(Path(out))] if phase == "save" else []),
        logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    module = make_boring()
    rank_batches = batches[trainer.global_rank :: 2]
    ckpt = Path(out) / "mid.ckpt" if phase == "resume" else None
    trainer.fit(module, train_dataloaders=DataLoader(rank_batches, batch_size=None), ckpt_path=ckpt)
    result = {"params": [p.detach() for p in module.parameters()], "global_step": trainer.global_step}
    torch.save(result, Path(out) / f"{phase}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    out, sync, strategy_name, inner_lr, K, n, phase = sys.argv[1:8]
    main(out, sync, strategy_name, float(inner_lr), int(K), int(n), phase)
    # Lightning keeps the process group alive after fit; tearing it down before exit avoids an abort
    # ("terminate called without an active exception") from gloo/DCP threads at interpreter shutdown.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
