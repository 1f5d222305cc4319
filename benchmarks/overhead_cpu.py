"""CPU overhead of NexusCallback against plain gradient accumulation, measured as a ratio in one run.

The quickstart's tiny GPT (recipes/quickstart.yaml shapes: block 128, batch 8, K=4) on random byte
tokens, trained through Lightning with and without the callback. The arms alternate (A B A B ...) so
that drift in machine load hits both, each arm's first fit is a warm-up, and both wall-clock and
process-CPU throughput are reported (the latter is far less sensitive to other jobs on the machine).

    python benchmarks/overhead_cpu.py --steps 15 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_nexus import NexusCallback
from recipes.models import GPT, GPTConfig


class _TinyLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = GPT(GPTConfig(size="tiny"))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self.model(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1)


def _fit(nexus: bool, args: argparse.Namespace) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process) for one fit."""
    torch.manual_seed(0)
    module = _TinyLM()
    n = args.steps * args.accumulate
    batches = list(torch.randint(0, 256, (n, args.batch_size, args.block + 1), generator=torch.Generator().manual_seed(1)))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, accumulate_grad_batches=args.accumulate,
        callbacks=[NexusCallback(inner_lr=0.05)] if nexus else [], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    loader = DataLoader(batches, batch_size=None)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, train_dataloaders=loader)
    tokens = n * args.batch_size * args.block
    return tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15, help="outer steps per fit")
    parser.add_argument("--accumulate", type=int, default=4, help="K micro-batches per window")
    parser.add_argument("--repeats", type=int, default=5, help="timed fits per arm (after one warm-up each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "nexus": []}
    for repeat in range(args.repeats + 1):
        for arm in ("plain", "nexus"):
            result = _fit(arm == "nexus", args)
            if repeat > 0:
                runs[arm].append(result)
    wall = {arm: statistics.median(r[0] for r in runs[arm]) for arm in runs}
    cpu = {arm: statistics.median(r[1] for r in runs[arm]) for arm in runs}
    record = {
        "benchmark": "overhead_cpu",
        "model": "recipes GPT tiny (quickstart)",
        "params": sum(p.numel() for p in GPT(GPTConfig(size="tiny")).parameters()),
        "shape": f"{args.batch_size}x{args.block}, K={args.accumulate}",
        "tokens_per_s_plain": round(wall["plain"]),
        "tokens_per_s_nexus": round(wall["nexus"]),
        "ratio_nexus_over_plain": round(wall["nexus"] / wall["plain"], 4),
        "ratio_nexus_over_plain_cpu_time": round(cpu["nexus"] / cpu["plain"], 4),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
    }
    print(
        f"plain accumulation {wall['plain']:,.0f} tokens/s, Nexus {wall['nexus']:,.0f} tokens/s: ratio "
        f"{record['ratio_nexus_over_plain']:.3f} (per CPU second {record['ratio_nexus_over_plain_cpu_time']:.3f}; "
        f"load average {record['load_average_1min']})"
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
