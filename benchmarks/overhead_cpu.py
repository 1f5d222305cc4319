"""CPU overhead of NexusCallback against plain gradient accumulation, measured as a ratio in one run.

The quickstart's tiny GPT (recipes/quickstart.yaml shapes: block 128, batch 8, K=4) on random byte
tokens, trained through Lightning with and without the callback. The arms alternate in balanced order
(A B, B A, ...; see ``benchmarks/ab.py``) so that drift in machine load hits both, each arm's first fit is
a warm-up, and both wall-clock and process-CPU throughput are reported (the latter is far less sensitive
to other jobs on the machine), with the range of the per-round ratios.

    python -m benchmarks.overhead_cpu --steps 15 --repeats 5
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from benchmarks.ab import Measurement, Stopwatch, overhead_main
from lightning_nexus import NexusCallback
from lightning_nexus_recipes.models import GPT, GPTConfig


class _TinyLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = GPT(GPTConfig(size="tiny"))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self.model(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1)


def _fit(nexus: bool, args: argparse.Namespace) -> Measurement:
    """Wall and process-CPU time of one whole fit, with its token count as the work done."""
    torch.manual_seed(0)
    module = _TinyLM()
    n = args.steps * args.accumulate
    batches = list(
        torch.randint(0, 256, (n, args.batch_size, args.block + 1), generator=torch.Generator().manual_seed(1))
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        callbacks=[NexusCallback(inner_lr=0.05)] if nexus else [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    loader = DataLoader(batches, batch_size=None)
    watch = Stopwatch()
    watch.start()
    trainer.fit(module, train_dataloaders=loader)
    wall, cpu = watch.stop()
    return Measurement(wall, cpu, work=n * args.batch_size * args.block)


def main() -> None:
    overhead_main("overhead_cpu", __doc__, _fit, labels=("plain accumulation", "Nexus"))


if __name__ == "__main__":
    main()
