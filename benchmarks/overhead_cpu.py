"""CPU overhead of NexusCallback against plain gradient accumulation, measured as a ratio in one run.

Same model, data and Trainer settings; the two arms alternate (A B A B ...) so drift in machine load
hits both; the first fit of each arm is a warm-up and is not counted.

    python benchmarks/overhead_cpu.py --steps 30 --repeats 3 --accumulate 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.demos.transformer import LightningTransformer
from torch.utils.data import DataLoader

from lightning_nexus import NexusCallback


class _Transformer(LightningTransformer):
    def prepare_data(self) -> None:  # the demo would download WikiText2; we feed random tokens
        pass


def _tokens_per_second(nexus: bool, args: argparse.Namespace) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process). The CPU-time figure is far less
    sensitive to other jobs on a shared machine; both are reported."""
    torch.manual_seed(0)
    module = _Transformer(vocab_size=args.vocab)
    gen = torch.Generator().manual_seed(1)
    n = args.steps * args.accumulate
    tokens = torch.randint(0, args.vocab, (n, args.batch_size, args.seq + 1), generator=gen)
    batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, accumulate_grad_batches=args.accumulate,
        callbacks=[NexusCallback(inner_lr=0.05)] if nexus else [], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    tokens = n * args.batch_size * args.seq
    return tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="outer steps per fit")
    parser.add_argument("--accumulate", type=int, default=4, help="K micro-batches per window")
    parser.add_argument("--repeats", type=int, default=3, help="timed fits per arm (after one warm-up each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"plain": [], "nexus": []}
    for repeat in range(args.repeats + 1):
        for arm in ("plain", "nexus"):
            tps = _tokens_per_second(arm == "nexus", args)
            if repeat > 0:
                results[arm].append(tps)
    plain, nexus = (statistics.median(t[0] for t in results[arm]) for arm in ("plain", "nexus"))
    plain_cpu, nexus_cpu = (statistics.median(t[1] for t in results[arm]) for arm in ("plain", "nexus"))
    record = {
        "benchmark": "overhead_cpu",
        "model": "lightning demo Transformer (2 layers, d=200)",
        "params": sum(p.numel() for p in _Transformer(vocab_size=args.vocab).parameters()),
        "accumulate": args.accumulate,
        "tokens_per_s_plain": round(plain),
        "tokens_per_s_nexus": round(nexus),
        "ratio_nexus_over_plain": round(nexus / plain, 4),
        "ratio_nexus_over_plain_cpu_time": round(nexus_cpu / plain_cpu, 4),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "repeats": args.repeats,
        "torch": torch.__version__,
        "lightning": pl.__version__,
    }
    print(f"plain accumulation: {plain:,.0f} tokens/s   Nexus: {nexus:,.0f} tokens/s   ratio {nexus / plain:.3f}"
          f"   (per CPU second: ratio {nexus_cpu / plain_cpu:.3f}; load average {os.getloadavg()[0]:.1f})")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
