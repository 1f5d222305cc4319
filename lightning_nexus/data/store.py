"""Token streams on disk: written with ``litdata.optimize`` (TokensLoader layout), read by memory map.

Writing is crash-safe: a build goes to a temporary sibling directory, gets a ``manifest.json`` with
the SHA-256 of every file, and only then is renamed into place. A directory without a manifest, or
whose files disagree with it, is never read as data (``CorruptCacheError``).

Reading bypasses ``StreamingDataset``: we need random access to arbitrary blocks chosen by the
schedule (same source on every rank, disjoint samples, replayable from an index), while
``StreamingDataset`` decides the sample order itself from rank/worker/epoch state. The chunk
layout we read is litdata's TokensLoader one (see ``litdata/streaming/item_loader.py``):
``[num_items: u32][offsets: u32 * (num_items + 1)][tokens]``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_nexus._compat import litdata_item_dtype
from lightning_nexus._writers import host_tag, writer_alive

MANIFEST = "manifest.json"
TOKENS_FILE = "tokens.npy"  # the pre-optimize staging array, deleted after the build


class CorruptCacheError(RuntimeError):
    """A cached token directory is incomplete or was modified."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _yield_slice(piece: tuple[str, int, int]) -> Any:
    # Module-level so that litdata can hand it to its worker process.
    path, start, stop = piece
    arr = np.load(path, mmap_mode="r")
    yield np.ascontiguousarray(arr[start:stop])


def _optimize(tokens_path: Path, n_tokens: int, out_dir: Path, chunk_tokens: int) -> None:
    from litdata import optimize
    from litdata.streaming.item_loader import TokensLoader

    pieces = [(str(tokens_path), a, min(a + chunk_tokens, n_tokens)) for a in range(0, n_tokens, chunk_tokens)]
    itemsize = np.load(tokens_path, mmap_mode="r").dtype.itemsize
    # litdata sets the *global* start method; "fork" is the Linux default anyway (and is ~40x faster
    # to start than spawn for a few MB), and we put back whatever the caller had.
    previous = multiprocessing.get_start_method(allow_none=True)
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    # litdata also draws from the global RNGs: without restoring them a cold build would shift seeded
    # model init, and one seed would give different runs depending on whether the cache existed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            optimize(
                fn=_yield_slice,
                inputs=pieces,
                output_dir=str(out_dir),
                chunk_bytes=chunk_tokens * itemsize + 4096,  # room for the header: one piece per chunk
                item_loader=TokensLoader(),
                num_workers=1,  # one worker keeps the chunk order, hence the bytes, deterministic
                reorder_files=False,
                mode="overwrite",
                start_method=method,
                verbose=False,
            )
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        if previous is not None and previous != multiprocessing.get_start_method(allow_none=True):
            multiprocessing.set_start_method(previous, force=True)
    index = out_dir / "index.json"
    meta = json.loads(index.read_text())
    # litdata stamps the build time, which would make identical builds differ; "0" is its own
    # documented fallback value for this field.
    meta["updated_at"] = "0"
    index.write_text(json.dumps(meta, sort_keys=True))


def write_token_dir(
    final_dir: Path,
    tokens: np.ndarray,
    info: dict[str, Any],
    chunk_tokens: int = 1 << 20,
) -> Path:
    """Write ``tokens`` (1-D integer array) as a litdata token dir at ``final_dir``, atomically."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        return final_dir
    if tokens.ndim != 1 or tokens.size == 0:
        raise ValueError(f"refusing to write an empty token stream to {final_dir}")
    tmp = make_build_dir(final_dir)
    try:
        staging = tmp / TOKENS_FILE
        np.save(staging, tokens)
        _optimize(staging, int(tokens.size), tmp / "data", chunk_tokens)
        staging.unlink()
        files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {**info, "num_tokens": int(tokens.size), "dtype": str(tokens.dtype), "files": files}
        # The manifest is the completeness marker, so it is written last.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        try:
            os.rename(tmp, final_dir)
        except OSError:
            if not (final_dir / MANIFEST).exists():  # not a concurrent builder that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final_dir


def make_build_dir(final_dir: Path) -> Path:
    """A fresh temporary sibling of ``final_dir`` to build into, after removing the ones that builders killed
    before they could clean up left behind (their names carry host and pid; a running builder's stay)."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_build_dirs(final_dir)
    prefix = f".{final_dir.name}.tmp-{host_tag()}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=final_dir.parent))


def remove_stale_build_dirs(final_dir: Path) -> list[Path]:
    """Delete ``.<name>.tmp-<host>-<pid>-*`` siblings of ``final_dir`` whose builder on this host has exited."""
    removed = []
    for tmp in final_dir.parent.glob(f".{final_dir.name}.tmp-*"):
        parts = tmp.name[len(f".{final_dir.name}.tmp-") :].split("-")
        if len(parts) < 3 or not parts[-2].isdigit() or "-".join(parts[:-2]) != host_tag():
            continue  # an older name without pid, or another host's build: not ours to judge
        if writer_alive(int(parts[-2])):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed

    return True


def read_manifest(
    directory: Path, verify: bool = True, what: str = "cache", rebuild: Path | None = None
) -> dict[str, Any]:
    """Load and (optionally) hash-check a directory written by ``write_token_dir``. ``rebuild``: the directory
    to delete to repair damage, when that is a parent of ``directory`` (default: ``directory`` itself)."""
    directory = Path(directory)
    fix = f"delete {rebuild if rebuild is not None else directory} and run again to rebuild it"
    path = directory / MANIFEST
    if not path.exists():
        raise CorruptCacheError(f"{what}: {directory} has no {MANIFEST} (an interrupted build?); {fix}")
    try:
        manifest = json.loads(path.read_text())
        files: dict[str, str] = manifest["files"]
    except (ValueError, KeyError) as err:
        raise CorruptCacheError(f"{what}: {path} is unreadable ({err}); {fix}") from err
    if verify:
        for rel, digest in files.items():
            p = directory / rel
            if not p.is_file():
                raise CorruptCacheError(f"{what}: file {p} listed in the manifest is missing; {fix}")
            if _sha256(p) != digest:
                raise CorruptCacheError(f"{what}: file {p} does not match its checksum; {fix}")
    return manifest


@dataclass
class _Chunk:
    path: str
    offset: int  # byte offset of the first token in the file
    start: int  # first token's position in the whole stream
    size: int


def _read_index(directory: Path, name: str) -> tuple[np.dtype, list[tuple[str, int, int]]]:
    index = directory / "index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"source '{name}': {directory} is not a litdata dataset (no index.json); write it with "
            "litdata.optimize(..., item_loader=TokensLoader()) or use format: text/jsonl"
        )
    meta = json.loads(index.read_text())
    formats = meta["config"].get("data_format") or []
    if len(formats) != 1 or formats[0].split(":")[0] not in ("no_header_numpy", "no_header_tensor"):
        raise ValueError(
            f"source '{name}': {directory} does not hold one token array per item (data_format {formats}); "
            "write it with litdata.optimize(..., item_loader=TokensLoader()) yielding 1-D integer arrays"
        )
    if meta["config"].get("compression"):
        raise ValueError(f"source '{name}': {directory} has compressed chunks; re-optimize it without compression")
    kind, idx = formats[0].split(":")
    dtype = litdata_item_dtype(kind, int(idx))
    if not isinstance(dtype, np.dtype):  # a torch dtype
        import torch

        dtype = torch.empty(0, dtype=dtype).numpy().dtype
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        raise ValueError(f"source '{name}': {directory} holds {dtype} values, not integer token ids")
    return dtype, [(c["filename"], int(c["chunk_size"]), int(c["dim"])) for c in meta["chunks"]]


class TokenStream:
    """A read-only view of a litdata token directory as one long 1-D token array.

    Chunks are memory-mapped lazily, per process, so the object pickles cheaply into
    DataLoader workers.
    """

    def __init__(self, litdata_dirs: str | os.PathLike | list[str | os.PathLike], name: str = "?") -> None:
        dirs = [litdata_dirs] if isinstance(litdata_dirs, (str, os.PathLike)) else list(litdata_dirs)
        self.dirs = [Path(d) for d in dirs]
        self.name = name
        self.chunks: list[_Chunk] = []
        self.dtype: np.dtype | None = None
        start = 0
        for d in self.dirs:
            dtype, chunks = _read_index(d, name)
            if self.dtype is not None and dtype != self.dtype:
                raise ValueError(
                    f"source '{name}': {d} holds {dtype} tokens but an earlier path holds {self.dtype}; re-optimize one of them"
                )
            self.dtype = dtype
            for fname, n_items, dim in chunks:
                self.chunks.append(_Chunk(str(d / fname), (n_items + 2) * 4, start, dim))
                start += dim
        self.num_tokens = start
        self._starts = np.array([c.start for c in self.chunks], dtype=np.int64)
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def _map(self, i: int) -> np.ndarray:
        m = self._maps.get(i)
        if m is None:
            c = self.chunks[i]
            assert self.dtype is not None  # set by __init__ from the first path
            m = np.memmap(c.path, dtype=self.dtype, mode="r", offset=c.offset, shape=(c.size,))
            self._maps[i] = m
        return m

    def read(self, start: int, length: int, out: np.ndarray) -> None:
        """Copy tokens ``[start, start + length)`` into ``out`` (may span chunks)."""
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = 0
        while pos < length:
            c = self.chunks[i]
            off = start + pos - c.start
            take = min(c.size - off, length - pos)
            out[pos : pos + take] = self._map(i)[off : off + take]
            pos += take
            i += 1

    def max_token(self, limit_tokens: int = 1 << 26) -> int:
        """Largest token id among the first ``limit_tokens`` tokens (a cheap vocab sanity check)."""
        best, seen = 0, 0
        for i, c in enumerate(self.chunks):
            if seen >= limit_tokens:
                break
            best = max(best, int(self._map(i)[: limit_tokens - seen].max(initial=0)))
            seen += c.size
        return best
