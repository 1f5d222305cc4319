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
import json
import os

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from benchmarks.ab import Measurement, Stopwatch, alternate, ratio, spread
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15, help="outer steps per fit")
    parser.add_argument("--accumulate", type=int, default=4, help="K micro-batches per window")
    parser.add_argument("--repeats", type=int, default=5, help="timed fits per arm (after one warm-up each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args()
    runs = alternate({"plain": lambda: _fit(False, args), "nexus": lambda: _fit(True, args)}, args.repeats, warmup=1)
    wall_rates = {arm: [m.wall_rate for m in runs[arm]] for arm in runs}
    cpu_rates = {arm: [m.cpu_rate for m in runs[arm]] for arm in runs}
    wall = {arm: spread(rates).median for arm, rates in wall_rates.items()}
    wall_ratio = ratio(wall_rates["nexus"], wall_rates["plain"])
    cpu_ratio = ratio(cpu_rates["nexus"], cpu_rates["plain"])
    record = {
        "benchmark": "overhead_cpu",
        "model": "recipes GPT tiny (quickstart)",
        "params": sum(p.numel() for p in GPT(GPTConfig(size="tiny")).parameters()),
        "shape": f"{args.batch_size}x{args.block}, K={args.accumulate}",
        "tokens_per_s_plain": round(wall["plain"]),
        "tokens_per_s_nexus": round(wall["nexus"]),
        "ratio_nexus_over_plain": round(wall_ratio.value, 4),
        "ratio_nexus_over_plain_range": [round(wall_ratio.paired.low, 4), round(wall_ratio.paired.high, 4)],
        "ratio_nexus_over_plain_cpu_time": round(cpu_ratio.value, 4),
        "ratio_nexus_over_plain_cpu_time_range": [round(cpu_ratio.paired.low, 4), round(cpu_ratio.paired.high, 4)],
        "load_average_1min": round(os.getloadavg()[0], 2),
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
    }
    print(
        f"plain accumulation {wall['plain']:,.0f} tokens/s, Nexus {wall['nexus']:,.0f} tokens/s: ratio "
        f"{wall_ratio.value:.3f}, per round {wall_ratio.paired.low:.3f}-{wall_ratio.paired.high:.3f} (per CPU second "
        f"{cpu_ratio.value:.3f}, per round {cpu_ratio.paired.low:.3f}-{cpu_ratio.paired.high:.3f}; "
        f"load average {record['load_average_1min']})"
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
