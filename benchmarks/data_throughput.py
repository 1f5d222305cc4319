"""Data-layer measurements: embedded corpus build time/size and packed tokens/s of the DataModule.

Usage: python -m benchmarks.data_throughput [--bytes-per-source 2000000] [--seconds 5]
       python -m benchmarks.data_throughput --formats   # format: tokens / parquet sources, T=1024 B=16,
                                                        # 2 workers, and the cost of the pre-training checks

The loader must never be the bottleneck: this reads train batches from MixedSourceDataModule
alone (no model) and reports tokens/s (input_ids elements) for a few shapes and worker counts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

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


def _loader_tps(dm: MixedSourceDataModule, seconds: float) -> float:
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    for _ in range(20):  # worker start-up is not throughput
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it)["input_ids"].numel()
    return n / (time.perf_counter() - t0)


def _corpus_documents(corpus) -> dict[str, list[str]]:
    """The embedded corpus's documents per source, decoded from its byte tokens (EOD = 0)."""
    from lightning_nexus.data.store import TokenStream

    out = {}
    for s in corpus.sources:
        stream = TokenStream(s.path, name=s.name)
        buf = np.empty(stream.num_tokens, dtype=stream.dtype)
        stream.read(0, stream.num_tokens, buf)
        out[s.name] = [d.decode("utf-8") for d in bytes(buf.astype(np.uint8)).split(b"\0") if d]
    return out


def measure_formats(bytes_per_source: int, seconds: float, workers: int = 2) -> dict:
    """tokens/s of format: tokens and format: parquet sources at T=1024 B=16, and the check overhead."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lightning_nexus.data import SourceSpec
    from lightning_nexus.data.sources import check_source_data

    report: dict = {}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        corpus = build_embedded_corpus(root / "cache", max_bytes_per_source=bytes_per_source, verbose=False)
        docs = _corpus_documents(corpus)
        train = [s.name for s in corpus.sources if s.role == "train"]
        tok_specs, pq_specs, txt_specs, jsonl_specs = [], [], [], []
        for name in train:
            ids = np.frombuffer(b"".join(x.encode() + b"\0" for x in docs[name]), dtype=np.uint8)
            ids.astype(np.uint16).tofile(root / f"{name}.bin")
            tok_specs.append(
                SourceSpec(name, [str(root / f"{name}.bin")], format="tokens", dtype="uint16", tokenizer="byte")
            )
            pq.write_table(pa.table({"text": docs[name]}), root / f"{name}.parquet", row_group_size=1000)
            pq_specs.append(SourceSpec(name, [str(root / f"{name}.parquet")], format="parquet"))
        for name, source_docs in docs.items():  # every embedded source, as the files a user would give
            (root / "txt" / name).mkdir(parents=True)
            for i, doc in enumerate(source_docs):
                (root / "txt" / name / f"{i}.txt").write_text(doc)
            txt_specs.append(SourceSpec(name, [str(root / "txt" / name)]))
            with open(root / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps({"text": doc}) + "\n" for doc in source_docs)
            jsonl_specs.append(SourceSpec(name, [str(root / f"{name}.jsonl")], format="jsonl"))
        for label, specs in (("tokens", tok_specs), ("parquet", pq_specs)):
            dm = MixedSourceDataModule(
                sources=specs, cache_dir=str(root / f"cache-{label}"), block_size=1024, batch_size=16,
                num_workers=workers, train_batches_per_epoch=10**7, val_batches_per_source=0,
            )  # fmt: skip
            t0 = time.perf_counter()
            dm.prepare_data()  # parquet: tokenized into the cache once; tokens: read in place
            prep = time.perf_counter() - t0
            tps = _loader_tps(dm, seconds)
            report[f"format: {label}"] = {"prepare_s": round(prep, 2), "tokens_per_s": round(tps)}
            print(
                f"format: {label:8s} T=1024 B=16 workers={workers}: {tps / 1e6:6.2f} M tokens/s (prepare {prep:.2f} s)"
            )
        for label, specs in (("text", txt_specs), ("jsonl", jsonl_specs)):
            n_files = sum(len(list(Path(s.paths[0]).rglob("*"))) if Path(s.paths[0]).is_dir() else 1 for s in specs)
            t0 = time.perf_counter()
            for spec in specs:
                check_source_data(spec)
            took = time.perf_counter() - t0
            report[f"checks: {label}"] = {"seconds": round(took, 3), "files": n_files}
            print(f"pre-training checks, embedded corpus as {label}: {took:.3f} s over {n_files} file(s)")
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bytes-per-source", type=int, default=2_000_000)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--formats", action="store_true", help="measure format: tokens/parquet and the data checks")
    args = ap.parse_args()
    if args.formats:
        print(json.dumps(measure_formats(args.bytes_per_source, args.seconds), indent=1))
        return
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
