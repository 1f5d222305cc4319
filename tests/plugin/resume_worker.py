"""Run by test_resume.py as a script: a Nexus run that validates (and so checkpoints) mid-window, on one
process or two CPU ranks (gloo), that can be SIGKILLed at a chosen batch and resumed from ``last.ckpt``.

Arguments: OUT MODE PHASE AT INNER_LR
  MODE     single | ddp_every | ddp_window | fsdp2
  PHASE    full (uninterrupted; copies ``last.ckpt`` as it is before global batch AT to OUT/snapshot.ckpt) |
           kill (blocks before global batch AT so the test can SIGKILL it) |
           resume (from OUT/snapshot.ckpt if it exists, else OUT/ckpt/last.ckpt) | full+resume (one after
           the other in the same processes)

K=3 with ``val_check_interval=5`` and a ModelCheckpoint that monitors ``val_loss``: Lightning writes
``last.ckpt`` after micro-batches 5 and 10 of each epoch (window positions 2 and 1; it skips a validation
that falls in the same optimizer step as the last save). Each rank appends the ids
of the batches it trains to OUT/{phase}_seen{rank}.txt as it goes, and at the end saves the gathered
parameters and its optimizer state to OUT/{phase}_rank{rank}.pt.
"""

import shutil
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_nexus import NexusCallback, NexusDDPStrategy
from tests.helpers import make_mlp, shard_mlp

K, BATCHES_PER_EPOCH, EPOCHS = 3, 12, 2


class ResumableBatches:
    """A fixed list of batches with ``state_dict``/``load_state_dict``, so Lightning resumes it mid-epoch."""

    def __init__(self, batches: list) -> None:
        self.batches, self._start, self._position = batches, 0, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        start, self._start = self._start, 0
        for i in range(start, len(self.batches)):
            self._position = i + 1
            yield self.batches[i]

    def state_dict(self) -> dict:
        return {"position": self._position}

    def load_state_dict(self, state: dict) -> None:
        self._start = int(state["position"])


def make_batches(world: int, rank: int) -> list:
    gen = torch.Generator().manual_seed(0)
    data = [(torch.tensor(i), torch.randn(2, 32, generator=gen)) for i in range(BATCHES_PER_EPOCH * world)]
    return data[rank::world]


class Net(pl.LightningModule):
    def __init__(self, out: Path, phase: str, sharded: bool) -> None:
        super().__init__()
        self.net = make_mlp(0)
        self.out, self.phase, self.sharded = out, phase, sharded

    def configure_model(self) -> None:
        if self.sharded:
            shard_mlp(self.net, self.device_mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        ids, x = batch
        with open(self.out / f"{self.phase}_seen{self.global_rank}.txt", "a") as f:
            f.write(f"{int(ids)}\n")
        return torch.nn.functional.mse_loss(self.net(x), torch.ones(x.shape[0], 2))

    def validation_step(self, batch, batch_idx):
        loss = torch.nn.functional.mse_loss(self.net(batch[1]), torch.ones(batch[1].shape[0], 2))
        self.log("val_loss", loss, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)  # stateful: resume must restore its moments


class _AtBatch(pl.Callback):
    """Before global batch ``at`` (the checkpoints up to there are written): stop dead until SIGKILLed, or
    keep a copy of ``last.ckpt`` as it is then."""

    def __init__(self, out: Path, at: int, block: bool) -> None:
        self.out, self.at, self.block, self.count = out, at, block, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.count == self.at and self.block:
            (self.out / f"blocked{trainer.global_rank}").touch()
            time.sleep(600)
        if self.count == self.at and trainer.global_rank == 0:
            shutil.copyfile(self.out / "ckpt" / "last.ckpt", self.out / "snapshot.ckpt")
        self.count += 1


def main(out: Path, mode: str, phase: str, at: int, inner_lr: float) -> None:
    world = 1 if mode == "single" else 2
    strategy = {
        "single": "auto",
        "ddp_every": NexusDDPStrategy(sync="every"),
        "ddp_window": NexusDDPStrategy(sync="window"),
        "fsdp2": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False),
    }[mode]
    nexus = NexusCallback(inner_lr=inner_lr)
    callbacks = [nexus, ModelCheckpoint(dirpath=out / "ckpt", monitor="val_loss", save_top_k=1, save_last=True)]
    if phase != "resume":
        callbacks.append(_AtBatch(out, at, block=phase == "kill"))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        max_epochs=EPOCHS,
        accumulate_grad_batches=K,
        val_check_interval=5,  # not a multiple of K: checkpoints land mid-window
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    rank = trainer.global_rank
    val = ResumableBatches(make_batches(world, rank)[:1])
    module = Net(out, phase, sharded=mode == "fsdp2")
    ckpt = None
    if phase == "resume":
        ckpt = out / "snapshot.ckpt" if (out / "snapshot.ckpt").exists() else out / "ckpt" / "last.ckpt"
    trainer.fit(
        module, train_dataloaders=ResumableBatches(make_batches(world, rank)), val_dataloaders=val, ckpt_path=ckpt
    )

    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in module.parameters()]
    opt_state = [
        (v.to_local() if hasattr(v, "to_local") else v).detach().clone()
        for state in trainer.optimizers[0].state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    ]
    result = {
        "params": [p.detach().clone() for p in params],
        "opt_state": opt_state,
        "global_step": trainer.global_step,
        "skipped_windows": nexus.skipped_windows,
        "completed_windows": nexus.completed_windows,
    }
    torch.save(result, out / f"{phase}_rank{rank}.pt")


if __name__ == "__main__":
    out, mode, phase, at, inner_lr = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    # "full+resume": both runs in one launch (saves the start-up of a second pair of processes)
    for one_phase in phase.split("+"):
        main(out, mode, one_phase, at, inner_lr)
    # Lightning keeps the process group alive after fit; tearing it down before exit avoids an abort
    # ("terminate called without an active exception") from gloo threads at interpreter shutdown.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
