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

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric

from benchmarks.ab import Measurement, Stopwatch, overhead_main
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
    overhead_main("fabric_overhead_cpu", __doc__, _loop, labels=("plain Fabric accumulation", "NexusFabric"))


if __name__ == "__main__":
    main()
