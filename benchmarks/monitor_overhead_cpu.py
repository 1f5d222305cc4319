"""CPU overhead of GradSimilarityMonitor at its default cadence, as a ratio measured in one run.

The quickstart model (tiny GPT, ~0.86M parameters, 8×128 tokens per micro-batch, K=4) with NexusCallback
is trained with and without the monitor; the arms alternate (A B A B ...) so drift in machine load hits
both, and the first fit of each arm is a warm-up. ``--every`` is ``Trainer(log_every_n_steps)``, which
the monitor follows by default (10 in recipes/quickstart.yaml, Lightning's default is 50).

    python benchmarks/monitor_overhead_cpu.py --steps 40 --repeats 3 --every 10 --mode auto
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_nexus import NexusCallback
from lightning_nexus.monitor import GradSimilarityMonitor
from recipes.models import GPTConfig
from recipes.module import CausalLMModule


class _NullLogger(pl.loggers.Logger):
    """Makes Lightning (and so the monitor) do its logging work without writing files."""

    name, version = "null", 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        pass


def _fit(monitor: bool, args: argparse.Namespace) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per outer step."""
    torch.manual_seed(0)
    module = CausalLMModule(model=GPTConfig(size="tiny", vocab_size=256), lr=1e-3, warmup_steps=5, max_steps=args.steps)
    gen = torch.Generator().manual_seed(1)
    n = args.steps * 4
    tokens = torch.randint(0, 256, (n, 8, 129), generator=gen)
    batches = [{"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(), "source_id": torch.full((8,), i % 4)}
               for i, t in enumerate(tokens)]
    callbacks: list[pl.Callback] = [NexusCallback(inner_lr=0.05)]
    if monitor:
        callbacks.append(GradSimilarityMonitor(mode=args.mode))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, accumulate_grad_batches=4, log_every_n_steps=args.every,
        callbacks=callbacks, logger=_NullLogger(), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return (time.perf_counter() - wall) / args.steps, (time.process_time() - cpu) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="outer steps per fit (a multiple of --every)")
    parser.add_argument("--repeats", type=int, default=3, help="timed fits per arm (after one warm-up each)")
    parser.add_argument("--every", type=int, default=10, help="log_every_n_steps (the monitor's cadence)")
    parser.add_argument("--mode", default="auto", choices=["auto", "exact", "sketch"])
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"without": [], "with": []}
    for repeat in range(args.repeats + 1):
        for arm in ("without", "with"):
            t = _fit(arm == "with", args)
            if repeat > 0:
                results[arm].append(t)
    wall = {arm: statistics.median(t[0] for t in v) for arm, v in results.items()}
    cpu = {arm: statistics.median(t[1] for t in v) for arm, v in results.items()}
    record = {
        "benchmark": "monitor_overhead_cpu",
        "model": "recipes tiny GPT, 8x128 tokens per micro-batch, K=4, NexusCallback",
        "mode": args.mode,
        "every_n_steps": args.every,
        "step_s_without": round(wall["without"], 4),
        "step_s_with": round(wall["with"], 4),
        "overhead_wall": round(wall["with"] / wall["without"] - 1, 4),
        "overhead_cpu_time": round(cpu["with"] / cpu["without"] - 1, 4),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "repeats": args.repeats,
        "torch": torch.__version__,
    }
    print(f"step time without monitor {wall['without'] * 1e3:.1f} ms, with {wall['with'] * 1e3:.1f} ms: overhead "
          f"{record['overhead_wall']:+.2%} wall, {record['overhead_cpu_time']:+.2%} CPU time")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
