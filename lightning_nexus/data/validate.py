"""Pre-training checks that refuse garbage data before any tokenizing or training starts.

Each check reads a bounded prefix of every file (``PREFIX_BYTES``; ``PREFIX_LINES`` JSONL records),
so a source of any size is checked in about the time it takes to open its files. The same rules are
enforced again, over every byte, while a source is tokenized into the cache (``strict_text`` and
``document_of`` below), so data past the prefix cannot slip through either.

Policy for text that is not valid UTF-8: **refused** (naming the file and the byte offset), never
decoded with replacement characters. A Latin-1 file trained as UTF-8 loses every accented letter
silently; converting it once (``iconv -f latin1 -t utf-8``) is cheap and makes the data what the
user meant.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

from lightning_nexus.data.errors import SourceError

PREFIX_BYTES = 1 << 16
"""Bytes read from the start of every text/JSONL file by the pre-training checks."""
PREFIX_LINES = 1000
"""JSONL records checked per file by the pre-training checks (within ``PREFIX_BYTES * 16``)."""

# (magic bytes at offset 0, what the file is, the ``format:`` to use or the fix)
_MAGIC: tuple[tuple[bytes, str, str], ...] = (
    (b"PAR1", "a Parquet file", "use format: parquet (field: <text column>)"),
    (b"ARROW1", "an Arrow IPC file", "use format: arrow on the datasets save_to_disk directory"),
    (b"\xff\xff\xff\xff", "an Arrow stream (datasets save_to_disk shard)", "use format: arrow on its directory"),
    (b"\x93NUMPY", "a NumPy .npy array", "save the raw ids with arr.tofile(path) and use format: tokens"),
    (b"PK\x03\x04", "a zip archive", "unpack it and point paths at the text files"),
    (b"\x1f\x8b", "a gzip file", "decompress it (gunzip) and point paths at the text"),
    (b"\x28\xb5\x2f\xfd", "a zstd file", "decompress it (zstd -d) and point paths at the text"),
    (b"BZh", "a bzip2 file", "decompress it (bunzip2) and point paths at the text"),
    (b"\xfd7zXZ\x00", "an xz file", "decompress it (unxz) and point paths at the text"),
    (b"\x7fELF", "an ELF executable", "remove it from paths"),
    (b"%PDF", "a PDF document", "extract its text first (e.g. pdftotext)"),
)


def sniff_binary(head: bytes) -> tuple[str, str] | None:
    """``(what, fix)`` when ``head`` (a file's first bytes) is binary data, else ``None``."""
    for magic, what, fix in _MAGIC:
        if head.startswith(magic):
            return what, fix
    if b"\0" in head:
        return (
            "binary data (it contains NUL bytes)",
            "token ids written as raw integers use format: tokens with dtype: uint16 or uint32; "
            "tables use format: parquet or arrow",
        )
    return None


def check_text_file(source: str, path: Path, fmt: str) -> None:
    """Refuse a ``text``/``jsonl`` file that is binary or not UTF-8, judging by its first bytes."""
    with open(path, "rb") as f:
        head = f.read(PREFIX_BYTES)
    found = sniff_binary(head)
    if found is not None:
        what, fix = found
        raise SourceError(f"source '{source}': {path} is {what}, not format: {fmt}; {fix}")
    _check_utf8(source, path, head, final=len(head) < PREFIX_BYTES)


def _check_utf8(source: str, path: Path, data: bytes, final: bool, offset: int = 0) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        decoder.decode(data, final=final)  # final=False: a character cut by the prefix end is fine
    except UnicodeDecodeError as err:
        raise SourceError(utf8_message(source, path, offset + err.start, data[err.start : err.start + 4])) from None


def utf8_message(source: str, path: Path | str, offset: int, sample: bytes) -> str:
    return (
        f"source '{source}': {path} is not valid UTF-8 (byte offset {offset}: {sample!r}); text must be UTF-8, "
        "it is never decoded with replacement characters: convert the file (e.g. iconv -f latin1 -t utf-8)"
    )


def strict_text(source: str, path: Path, data: bytes, offset: int = 0) -> str:
    """``data`` (a file, or the part of it at byte ``offset``) as text, refusing NUL bytes, the binary
    formats ``check_text_file`` recognizes, and invalid UTF-8."""
    found = sniff_binary(data[:PREFIX_BYTES]) if offset == 0 else None
    if found is None and b"\0" in data:
        found = ("binary data (it contains NUL bytes)", "remove the binary parts or the file")
    if found is not None:
        raise SourceError(f"source '{source}': {path} is {found[0]}, not text; {found[1]}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SourceError(utf8_message(source, path, offset + err.start, data[err.start : err.start + 4])) from None


def document_of(source: str, record: Any, field: str, where: str) -> str:
    """The document held by a JSONL record or table row, refusing missing, null and non-string values."""
    if not isinstance(record, dict) or field not in record:
        raise SourceError(f"source '{source}': {where} has no field {field!r}; set field to the one holding the text")
    value = record[field]
    if value is None:
        raise SourceError(f"source '{source}': {where} has {field!r}: null; drop the record or fill in its text")
    if not isinstance(value, str):
        raise SourceError(
            f"source '{source}': {where} has {field!r} of type {type(value).__name__}, not a string; "
            "documents must be text (pre-tokenized ids: use format: tokens or litdata)"
        )
    if "\0" in value:
        raise SourceError(f"source '{source}': {where} holds NUL characters in {field!r}; that is binary, not text")
    return value


def check_jsonl_file(source: str, path: Path, field: str) -> None:
    """Refuse a JSONL file whose first ``PREFIX_LINES`` records are not JSON objects with a string ``field``."""
    check_text_file(source, path, "jsonl")
    budget = PREFIX_BYTES * 16
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno > PREFIX_LINES or budget <= 0:
                break
            budget -= len(raw)
            _check_utf8(source, path, raw, final=True)
            parse_jsonl_line(source, path, lineno, raw.decode("utf-8"), field)


def parse_jsonl_line(source: str, path: Path | str, lineno: int, line: str, field: str) -> str | None:
    """The document of one JSONL line (``None`` for a blank line), with file:line in every refusal."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise SourceError(
            f"source '{source}': {path}:{lineno} is not valid JSON ({err.msg}); fix or remove the line"
        ) from err
    return document_of(source, record, field, f"{path}:{lineno}")
