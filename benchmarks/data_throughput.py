"""Data-layer measurements: embedded corpus build time/size and packed tokens/s of the DataModule.

Usage: python -m benchmarks.data_throughput [--bytes-per-source 2000000] [--seconds 5]

The loader must never be the bottleneck: this reads train batches from MixedSourceDataModule
alone (no model) and reports tokens/s (input_ids elements) for a few shapes and worker counts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lightning_nexus.data import MixedSourceDataModule, build_embedded_corpus


def measure_build(bytes_per_source: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        corpus = build_embedded_corpus(d, max_bytes_per_source=bytes_per_source, verbose=True)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_embedded_corpus(d, max_bytes_per_source=bytes_per_source, verbose=False)
        warm = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(corpus.root).rglob("*") if p.is_file())
        return {
            "build_s": round(cold, 2),
            "cached_load_s": round(warm, 3),
            "disk_mb": round(size / 1e6, 2),
            "sources": {s.name: [s.role, s.num_tokens] for s in corpus.sources},
        }


def measure_loader(
    cache: str, bytes_per_source: int, block: int, batch: int, workers: int, mixing: str, seconds: float
) -> float:
    dm = MixedSourceDataModule(
        cache_dir=cache,
        block_size=block,
        batch_size=batch,
        num_workers=workers,
        mixing=mixing,
        corpus_bytes_per_source=bytes_per_source,
        train_batches_per_epoch=10**7,
    )
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    for _ in range(20):  # worker start-up is not throughput
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it)["input_ids"].numel()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bytes-per-source", type=int, default=2_000_000)
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    report: dict = {"corpus": measure_build(args.bytes_per_source), "loader_tokens_per_s": {}}
    with tempfile.TemporaryDirectory() as cache:
        build_embedded_corpus(cache, max_bytes_per_source=args.bytes_per_source, verbose=False)
        for block, batch in ((256, 8), (1024, 16), (2048, 32)):
            for workers in (0, 2):
                for mixing in ("per_source", "sample"):
                    tps = measure_loader(cache, args.bytes_per_source, block, batch, workers, mixing, args.seconds)
                    key = f"T={block} B={batch} workers={workers} {mixing}"
                    report["loader_tokens_per_s"][key] = round(tps)
                    print(f"{key:45s} {tps / 1e6:7.2f} M tokens/s", flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
