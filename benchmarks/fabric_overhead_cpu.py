"""CPU overhead of NexusFabric against a plain Fabric gradient-accumulation loop, as a ratio in one run.

The quickstart's tiny GPT (recipes/quickstart.yaml shapes: block 128, batch 8, K=4) on random byte
tokens, trained by two hand-written Fabric loops: ``fabric.backward(loss / K)`` with ``optimizer.step()``
every K micro-batches, and ``NexusFabric.backward(loss)`` with ``NexusFabric.step()``. Same protocol as
``benchmarks/overhead_cpu.py``: arms alternate in balanced order, one warm-up each, wall-clock and
process-CPU throughput with the range of the per-round ratios.

    python -m benchmarks.fabric_overhead_cpu --steps 15 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os

import lightning
import torch
import torch.nn.functional as F
from lightning.fabric import Fabric

from benchmarks.ab import Measurement, Stopwatch, alternate, ratio, spread
from lightning_nexus.fabric import NexusFabric
from lightning_nexus_recipes.models import GPT, GPTConfig


def _loop(nexus: bool, args: argparse.Namespace) -> Measurement:
    """Wall and process-CPU time of one whole training loop, with its token count as the work done."""
    torch.manual_seed(0)
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    net = GPT(GPTConfig(size="tiny"))
    model, optimizer = fabric.setup(net, torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1))
    n = args.steps * args.accumulate
    batches = list(
        torch.randint(0, 256, (n, args.batch_size, args.block + 1), generator=torch.Generator().manual_seed(1))
    )
    runner = NexusFabric(fabric, model, optimizer, inner_lr=0.05) if nexus else None
    watch = Stopwatch()
    watch.start()
    for i, batch in enumerate(batches):
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        boundary = (i + 1) % args.accumulate == 0
        if runner is not None:
            runner.backward(loss)
            if boundary:
                runner.step()
        else:
            fabric.backward(loss / args.accumulate)
            if boundary:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    wall, cpu = watch.stop()
    return Measurement(wall, cpu, work=n * args.batch_size * args.block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15, help="outer steps per loop")
    parser.add_argument("--accumulate", type=int, default=4, help="K micro-batches per window")
    parser.add_argument("--repeats", type=int, default=5, help="timed loops per arm (after one warm-up each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    args = parser.parse_args()
    runs = alternate({"plain": lambda: _loop(False, args), "nexus": lambda: _loop(True, args)}, args.repeats, warmup=1)
    wall_rates = {arm: [m.wall_rate for m in runs[arm]] for arm in runs}
    cpu_rates = {arm: [m.cpu_rate for m in runs[arm]] for arm in runs}
    wall = {arm: spread(rates).median for arm, rates in wall_rates.items()}
    wall_ratio = ratio(wall_rates["nexus"], wall_rates["plain"])
    cpu_ratio = ratio(cpu_rates["nexus"], cpu_rates["plain"])
    record = {
        "benchmark": "fabric_overhead_cpu",
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
        "lightning": lightning.__version__,
    }
    print(
        f"plain Fabric accumulation {wall['plain']:,.0f} tokens/s, NexusFabric {wall['nexus']:,.0f} tokens/s: ratio "
        f"{wall_ratio.value:.3f}, per round {wall_ratio.paired.low:.3f}-{wall_ratio.paired.high:.3f} (per CPU second "
        f"{cpu_ratio.value:.3f}, per round {cpu_ratio.paired.low:.3f}-{cpu_ratio.paired.high:.3f}; "
        f"load average {record['load_average_1min']})"
    )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
