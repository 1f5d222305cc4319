"""Readers for the table and token-file source formats: ``parquet``, ``arrow`` and ``tokens``.

``parquet`` and ``arrow`` hold documents in a text column; they are read with pyarrow / ``datasets``
(row group by row group, or batch by batch from the memory-mapped Arrow table, never loaded whole)
and tokenized into the cache like ``text``/``jsonl``. ``tokens`` is a flat binary file of token ids
(nanoGPT's ``train.bin``) read in place through a ``numpy.memmap``: no copy, no cache.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lightning_nexus.data.errors import SourceError
from lightning_nexus.data.validate import document_of, sniff_binary

TOKEN_DTYPES = ("uint16", "uint32")
_ROWS_PER_BATCH = 4096


def require(module: str, extra: str, what: str) -> Any:
    """Import an optional dependency, or say which extra of ``lightning-nexus`` installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{what} needs the `{module.split('.')[0]}` package: pip install 'lightning-nexus[{extra}]'"
        ) from err


def _string_column(source: str, where: str, schema: Any, field: str) -> None:
    pa = require("pyarrow", "formats", "format: parquet/arrow")
    if field not in schema.names:
        raise SourceError(
            f"source '{source}': {where} has no column {field!r} (columns: {schema.names}); set field to the text column"
        )
    kind = schema.field(field).type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_view(kind)):
        raise SourceError(
            f"source '{source}': column {field!r} of {where} is {kind}, not a string; documents must be text "
            "(pre-tokenized ids: write them as format: tokens or litdata)"
        )


def parquet_documents(source: str, files: list[Path], field: str) -> Iterator[str]:
    """Documents of column ``field``, streamed one row group at a time."""
    pq = require("pyarrow.parquet", "formats", "format: parquet")
    for f in files:
        pf = pq.ParquetFile(f)
        _string_column(source, str(f), pf.schema_arrow, field)
        row = 0
        for batch in pf.iter_batches(batch_size=_ROWS_PER_BATCH, columns=[field]):
            for value in batch.column(0).to_pylist():
                yield document_of(source, {field: value}, field, f"{f} row {row}")
                row += 1


def check_parquet_file(source: str, path: Path, field: str) -> None:
    """Refuse a file that is not Parquet or lacks a string ``field`` column (reads only the footer)."""
    pq = require("pyarrow.parquet", "formats", "format: parquet")
    try:
        schema = pq.read_schema(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError variants for non-parquet input
        raise SourceError(f"source '{source}': {path} is not a Parquet file ({err}); fix paths or the format") from err
    _string_column(source, str(path), schema, field)


def load_arrow_dataset(source: str, directory: Path) -> Any:
    """A ``datasets.Dataset`` saved with ``save_to_disk`` (memory-mapped, not read)."""
    datasets = require("datasets", "formats", "format: arrow")
    try:
        ds = datasets.load_from_disk(str(directory))
    except FileNotFoundError as err:
        raise SourceError(
            f"source '{source}': {directory} is not a datasets save_to_disk directory ({err}); "
            "write it with Dataset.save_to_disk(path)"
        ) from err
    if isinstance(ds, datasets.DatasetDict):
        raise SourceError(
            f"source '{source}': {directory} is a DatasetDict with splits {list(ds)}; point paths at one split, "
            f"e.g. {directory / next(iter(ds))}"
        )
    return ds


def arrow_documents(source: str, dirs: list[Path], field: str) -> Iterator[str]:
    for d in dirs:
        ds = load_arrow_dataset(source, d)
        _string_column(source, str(d), ds.data.schema, field)
        row = 0
        for batch in ds.data.to_reader(max_chunksize=_ROWS_PER_BATCH):
            for value in batch.column(batch.schema.get_field_index(field)).to_pylist():
                yield document_of(source, {field: value}, field, f"{d} row {row}")
                row += 1


def check_arrow_dir(source: str, directory: Path, field: str) -> None:
    ds = load_arrow_dataset(source, directory)
    _string_column(source, str(directory), ds.data.schema, field)


class MemmapTokens:
    """Flat binary token files (``dtype`` ids, native byte order) as one read-only token stream.

    The same reading interface as ``store.TokenStream`` (``num_tokens``, ``dtype``, ``read``,
    ``max_token``); files are mapped lazily per process, so the object pickles cheaply into workers.
    """

    def __init__(self, files: list[Path], dtype: str, name: str = "?") -> None:
        if dtype not in TOKEN_DTYPES:
            raise SourceError(
                f"source '{name}': format: tokens needs dtype: one of {list(TOKEN_DTYPES)}, got {dtype!r}"
            )
        self.name, self.files, self.dtype = name, [Path(f) for f in files], np.dtype(dtype)
        sizes = []
        for f in self.files:
            with open(f, "rb") as fh:
                found = sniff_binary(fh.read(16).replace(b"\0", b"_"))  # NUL bytes are normal in token ids
            if found is not None:
                raise SourceError(f"source '{name}': {f} is {found[0]}, not raw token ids; {found[1]}")
            size = os.path.getsize(f)
            if size % self.dtype.itemsize:
                raise SourceError(
                    f"source '{name}': {f} has {size} bytes, not a multiple of {self.dtype.itemsize} ({dtype}); "
                    "is dtype right?"
                )
            sizes.append(size // self.dtype.itemsize)
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_tokens = int(self._starts[-1])
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def _map(self, i: int) -> np.ndarray:
        m = self._maps.get(i)
        if m is None:
            m = np.memmap(self.files[i], dtype=self.dtype, mode="r")
            self._maps[i] = m
        return m

    def read(self, start: int, length: int, out: np.ndarray) -> None:
        """Copy tokens ``[start, start + length)`` into ``out`` (may span files)."""
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = 0
        while pos < length:
            off = start + pos - int(self._starts[i])
            take = min(int(self._starts[i + 1]) - int(self._starts[i]) - off, length - pos)
            out[pos : pos + take] = self._map(i)[off : off + take]
            pos += take
            i += 1

    def max_token(self, limit_tokens: int = 1 << 26) -> int:
        """Largest token id among the first ``limit_tokens`` tokens of every file."""
        tops = [
            int(self._map(i)[:limit_tokens].max(initial=0))
            for i in range(len(self.files))
            if self._starts[i + 1] > self._starts[i]
        ]
        return max(tops, default=0)
