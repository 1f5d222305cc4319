"""CPU overhead of GradSimilarityMonitor at its default cadence, as a ratio measured in one run.

The quickstart model (tiny GPT, ~0.86M parameters, 8×128 tokens per micro-batch, K=4) with NexusCallback
is trained with and without the monitor; the arms alternate in balanced order (A B, B A, ...; see
``benchmarks/ab.py``) so drift in machine load hits both, and the first fit of each arm is a warm-up.
``--every`` is ``Trainer(log_every_n_steps)``, which the monitor follows by default (10 in
recipes/quickstart.yaml, Lightning's default is 50).

    python -m benchmarks.monitor_overhead_cpu --steps 40 --repeats 3 --every 10 --mode auto
"""

from __future__ import annotations

import argparse
import json
import os

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from benchmarks.ab import Measurement, NullLogger, Stopwatch, alternate, ratio, spread
from lightning_nexus import NexusCallback
from lightning_nexus.monitor import GradSimilarityMonitor
from lightning_nexus_recipes.models import GPTConfig
from lightning_nexus_recipes.module import CausalLMModule


def _fit(monitor: bool, args: argparse.Namespace) -> Measurement:
    """Wall and process-CPU time of one whole fit, with its outer steps as the work done."""
    torch.manual_seed(0)
    module = CausalLMModule(model=GPTConfig(size="tiny", vocab_size=256), lr=1e-3, warmup_steps=5, max_steps=args.steps)
    gen = torch.Generator().manual_seed(1)
    n = args.steps * 4
    tokens = torch.randint(0, 256, (n, 8, 129), generator=gen)
    batches = [
        {"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(), "source_id": torch.full((8,), i % 4)}
        for i, t in enumerate(tokens)
    ]
    callbacks: list[pl.Callback] = [NexusCallback(inner_lr=0.05)]
    if monitor:
        callbacks.append(GradSimilarityMonitor(mode=args.mode))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        accumulate_grad_batches=4,
        log_every_n_steps=args.every,
        callbacks=callbacks,
        logger=NullLogger(),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    watch = Stopwatch()
    watch.start()
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    wall, cpu = watch.stop()
    return Measurement(wall, cpu, work=args.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="outer steps per fit (a multiple of --every)")
    parser.add_argument("--repeats", type=int, default=3, help="timed fits per arm (after one warm-up each)")
    parser.add_argument("--every", type=int, default=10, help="log_every_n_steps (the monitor's cadence)")
    parser.add_argument("--mode", default="auto", choices=["auto", "exact", "sketch"])
    args = parser.parse_args()
    runs = alternate({"without": lambda: _fit(False, args), "with": lambda: _fit(True, args)}, args.repeats, warmup=1)
    # seconds per outer step
    wall_steps = {arm: [m.wall_s / m.work for m in runs[arm]] for arm in runs}
    cpu_steps = {arm: [m.cpu_s / m.work for m in runs[arm]] for arm in runs}
    wall = {arm: spread(times).median for arm, times in wall_steps.items()}
    wall_ratio = ratio(wall_steps["with"], wall_steps["without"])
    cpu_ratio = ratio(cpu_steps["with"], cpu_steps["without"])
    record = {
        "benchmark": "monitor_overhead_cpu",
        "model": "recipes tiny GPT, 8x128 tokens per micro-batch, K=4, NexusCallback",
        "mode": args.mode,
        "every_n_steps": args.every,
        "step_s_without": round(wall["without"], 4),
        "step_s_with": round(wall["with"], 4),
        "overhead_wall": round(wall_ratio.value - 1, 4),
        "overhead_wall_range": [round(wall_ratio.paired.low - 1, 4), round(wall_ratio.paired.high - 1, 4)],
        "overhead_cpu_time": round(cpu_ratio.value - 1, 4),
        "overhead_cpu_time_range": [round(cpu_ratio.paired.low - 1, 4), round(cpu_ratio.paired.high - 1, 4)],
        "load_average_1min": round(os.getloadavg()[0], 2),
        "repeats": args.repeats,
        "torch": torch.__version__,
    }
    print(
        f"step time without monitor {wall['without'] * 1e3:.1f} ms, with {wall['with'] * 1e3:.1f} ms: overhead "
        f"{wall_ratio.value - 1:+.2%} wall (per round {wall_ratio.paired.low - 1:+.2%} to "
        f"{wall_ratio.paired.high - 1:+.2%}), {cpu_ratio.value - 1:+.2%} CPU time (per round "
        f"{cpu_ratio.paired.low - 1:+.2%} to {cpu_ratio.paired.high - 1:+.2%})"
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
