"""User data sources (``SourceSpec``), their validation, and their conversion into token streams.

Document sources (``text``, ``jsonl``, ``parquet``, ``arrow``) are tokenized once into the cache
(litdata token dirs, keyed by the input files' paths, sizes and mtimes and by the tokenizer);
pre-tokenized sources (``litdata`` dirs, ``tokens`` files) are read in place.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_nexus.data import formats
from lightning_nexus.data.errors import SourceError
from lightning_nexus.data.store import TokenStream, read_manifest, write_token_dir
from lightning_nexus.data.tokenizer import Tokenizer, TokenizerRecord, record_of, stated_record
from lightning_nexus.data.validate import parse_jsonl_line, strict_text

SOURCES_VERSION = "2"
ROLES = ("train", "ood")
DOCUMENT_FORMATS = ("text", "jsonl", "parquet", "arrow")
PRETOKENIZED_FORMATS = ("litdata", "tokens")
FORMATS = DOCUMENT_FORMATS + PRETOKENIZED_FORMATS

__all__ = ["SourceError", "SourceSpec"]


@dataclass
class SourceSpec:
    """One data source of a mixed-source run.

    Example (YAML, under ``data.init_args.sources``)::

        - name: wiki
          paths: [/data/wiki/*.txt]
          weight: 2.0
        - name: code
          paths: [/data/code.jsonl]
          format: jsonl
          field: content
        - name: web
          paths: [/data/web/]          # every .parquet file below it
          format: parquet
        - name: owt
          paths: [/data/owt/train.bin]
          format: tokens
          dtype: uint16
          tokenizer: gpt2              # what produced the ids (a tokenizer.json path, byte, or a name)
          role: ood
    """

    name: str
    """Source name: used in logged tags (``train/loss/<name>``, ``val/loss/<name>``)."""
    paths: list[str] = field(default_factory=list)
    """Files, directories (read recursively) or glob patterns (``**`` allowed); for ``litdata`` and
    ``arrow``: dataset directories."""
    # typed loosely on purpose: a non-number then reaches validate_specs, whose error names the source,
    # instead of a parser error that does not
    weight: float | str = 1.0
    """Relative share of training micro-batches, a number (train sources: must be > 0)."""
    role: str = "train"
    """``train``: trained on and validated; ``ood``: validation only (reported under ``val/loss/ood``)."""
    format: str = "text"
    """``text`` (each file is a document, UTF-8), ``jsonl`` (one record per line), ``parquet`` (a text
    column), ``arrow`` (a ``datasets`` ``save_to_disk`` directory), ``tokens`` (flat binary token
    ids) or ``litdata`` (``litdata.optimize(..., item_loader=TokensLoader())`` output)."""
    field: str = "text"
    """JSONL field / table column holding the document (``jsonl``, ``parquet``, ``arrow``)."""
    jsonl_field: str | None = None
    """Alias of ``field`` (kept for older configs)."""
    dtype: str | None = None
    """Token id type of ``format: tokens`` files: ``uint16`` or ``uint32``."""
    tokenizer: str | None = None
    """Pre-tokenized sources (``tokens``, ``litdata``) must state what produced their ids: ``byte``,
    a path to the Hugging Face ``tokenizer.json``, or a name (``gpt2``); sources whose tokenizers
    differ are refused. Document sources use the DataModule's ``tokenizer``."""

    def __post_init__(self) -> None:
        if isinstance(self.weight, str):
            try:
                self.weight = float(self.weight)
            except ValueError:
                pass  # refused by validate_specs, naming the source
        if self.jsonl_field is not None:
            if self.field not in ("text", self.jsonl_field):
                raise SourceError(
                    f"source '{self.name}': field={self.field!r} and its alias jsonl_field={self.jsonl_field!r} "
                    "disagree; give only field"
                )
            self.field = self.jsonl_field


def validate_specs(specs: list[SourceSpec]) -> None:
    """Check everything that can be checked without reading data."""
    if not specs:
        raise SourceError("no sources given; pass at least one train source, or sources: null for the embedded corpus")
    specs = [SourceSpec(**s) if isinstance(s, dict) else s for s in specs]
    seen: set[str] = set()
    for s in specs:
        where = f"source '{s.name}'"
        if not s.name or not isinstance(s.name, str) or any(c in s.name for c in "/\\ "):
            raise SourceError(f"source name {s.name!r} is not usable in log tags; use letters, digits, '_' or '-'")
        if s.name in seen:
            raise SourceError(f"{where} is listed twice; give every source a distinct name")
        seen.add(s.name)
        if s.role not in ROLES:
            raise SourceError(f"{where}: unknown role {s.role!r}; use one of {list(ROLES)}")
        if s.format not in FORMATS:
            raise SourceError(f"{where}: unknown format {s.format!r}; use one of {list(FORMATS)}")
        if isinstance(s.weight, bool) or not isinstance(s.weight, (int, float)) or not math.isfinite(s.weight):
            raise SourceError(f"{where}: weight {s.weight!r} must be a finite number > 0")
        if s.role == "train" and s.weight <= 0:
            raise SourceError(
                f"{where}: a train source needs weight > 0, got {s.weight!r}; to hold it out of training use role: ood, "
                "or remove it"
            )
        if isinstance(s.paths, str) or not s.paths:
            raise SourceError(f"{where}: paths must be a non-empty list of files, directories or globs")
        if s.format == "tokens" and s.dtype not in formats.TOKEN_DTYPES:
            raise SourceError(
                f"{where}: format: tokens needs dtype: one of {list(formats.TOKEN_DTYPES)}, got {s.dtype!r}"
            )
        if s.format != "tokens" and s.dtype is not None:
            raise SourceError(f"{where}: dtype applies to format: tokens only; remove it")
        if s.format in PRETOKENIZED_FORMATS and not s.tokenizer:
            raise SourceError(
                f"{where}: format: {s.format} holds token ids but does not say which tokenizer produced them; add "
                "tokenizer: byte, tokenizer: <path to tokenizer.json> or tokenizer: <name> (e.g. gpt2)"
            )
        if s.format in DOCUMENT_FORMATS and s.tokenizer is not None:
            raise SourceError(
                f"{where}: format: {s.format} is tokenized by the DataModule's tokenizer; remove the source's tokenizer"
            )
    if not any(s.role == "train" for s in specs):
        raise SourceError("no source has role 'train'; mark at least one source role: train")


def _has_magic(p: str) -> bool:
    return any(c in p for c in "*?[")


def _takes_dirs(fmt: str) -> bool:
    return fmt in ("litdata", "arrow")


def expand_paths(spec: SourceSpec) -> list[Path]:
    """Files (for litdata/arrow: dataset dirs) of a source, in a stable order; raises if a path matches nothing."""
    out: list[Path] = []
    for raw in spec.paths:
        p = os.path.expanduser(str(raw))
        if _has_magic(p):
            matches = sorted(glob.glob(p, recursive=True))
            if not matches:
                raise SourceError(f"source '{spec.name}': pattern {raw!r} matches no file; fix the path or remove it")
        elif not os.path.exists(p):
            raise SourceError(f"source '{spec.name}': path {raw!r} does not exist; fix the path or remove it")
        else:
            matches = [p]
        for m in matches:
            mp = Path(m)
            if _takes_dirs(spec.format):
                if mp.is_dir():
                    out.append(mp)
            elif mp.is_dir():
                files = sorted(f for f in mp.rglob("*") if f.is_file() and not f.name.startswith("."))
                if spec.format == "parquet":  # a dataset directory also holds metadata files
                    files = [f for f in files if f.suffix == ".parquet"]
                out.extend(files)
            elif mp.is_file():
                out.append(mp)
    if not out:
        kind = f"{spec.format} dataset directories" if _takes_dirs(spec.format) else "files"
        raise SourceError(f"source '{spec.name}': paths {spec.paths} contain no {kind}; point paths at your data")
    return out


def check_source_data(spec: SourceSpec) -> None:
    """The bounded-prefix data checks of one source (binary/UTF-8/JSONL records, table columns)."""
    from lightning_nexus.data import validate

    files = expand_paths(spec)
    if spec.format == "text":
        for f in files:
            validate.check_text_file(spec.name, f, "text")
    elif spec.format == "jsonl":
        for f in files:
            validate.check_jsonl_file(spec.name, f, spec.field)
    elif spec.format == "parquet":
        for f in files:
            formats.check_parquet_file(spec.name, f, spec.field)
    elif spec.format == "arrow":
        for d in files:
            formats.check_arrow_dir(spec.name, d, spec.field)


def _documents(spec: SourceSpec, files: list[Path]) -> Iterator[str]:
    if spec.format == "parquet":
        yield from formats.parquet_documents(spec.name, files, spec.field)
        return
    if spec.format == "arrow":
        yield from formats.arrow_documents(spec.name, files, spec.field)
        return
    for f in files:
        if spec.format == "text":
            yield strict_text(spec.name, f, f.read_bytes())
            continue
        with open(f, "rb") as fh:  # line by line: a JSONL file may be far larger than memory
            offset = 0
            for lineno, raw in enumerate(fh, 1):
                line = strict_text(spec.name, f, raw, offset)
                offset += len(raw)
                doc = parse_jsonl_line(spec.name, f, lineno, line, spec.field)
                if doc is not None:
                    yield doc


def _files_key(files: list[Path]) -> list:
    def key(f: Path) -> list:
        # a datasets dir is keyed by its files, so re-saving it in place is noticed
        parts = sorted(p for p in f.rglob("*") if p.is_file()) if f.is_dir() else [f]
        return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in parts]

    return [key(f) for f in files]


def train_user_bpe(specs: list[SourceSpec], cache: Path, vocab_size: int, max_chars: int = 50_000_000) -> Tokenizer:
    """A BPE tokenizer trained on (the first ``max_chars`` of) the document train sources, cached."""
    from lightning_nexus.data.tokenizer import BPETokenizer

    text_train = [s for s in specs if s.role == "train" and s.format in DOCUMENT_FORMATS]
    if not text_train:
        raise SourceError("tokenizer='bpe' needs at least one text, jsonl, parquet or arrow train source to learn from")
    key = hashlib.sha256(
        json.dumps(
            [SOURCES_VERSION, vocab_size, max_chars]
            + [[s.name, s.format, s.field, _files_key(expand_paths(s))] for s in text_train]
        ).encode()
    ).hexdigest()[:16]
    path = cache / "tokenizers" / f"bpe-{vocab_size}-{key}.json"
    if path.exists():
        return BPETokenizer(path)

    def docs() -> Iterator[str]:
        total = 0
        for s in text_train:
            for d in _documents(s, expand_paths(s)):
                yield d
                total += len(d)
                if total >= max_chars:
                    return

    return BPETokenizer.train(docs(), vocab_size, path)


def source_record(spec: SourceSpec, tokenizer: Tokenizer) -> TokenizerRecord:
    """The tokenizer whose ids the source holds: the run's for document sources, the stated one otherwise."""
    if spec.format in PRETOKENIZED_FORMATS:
        try:
            return stated_record(str(spec.tokenizer))
        except (OSError, ValueError, ImportError) as err:
            raise SourceError(f"source '{spec.name}': its tokenizer {spec.tokenizer!r} cannot be read ({err})") from err
    return record_of(tokenizer)


def resolve_source(
    spec: SourceSpec, tokenizer: Tokenizer, cache: Path, verify: bool = True
) -> TokenStream | formats.MemmapTokens:
    """Turn a spec into a token stream, tokenizing document formats into the cache the first time."""
    files = expand_paths(spec)
    stream: TokenStream | formats.MemmapTokens
    if spec.format == "litdata":
        stream = TokenStream(list[str | os.PathLike](files), name=spec.name)
    elif spec.format == "tokens":
        stream = formats.MemmapTokens(files, str(spec.dtype), name=spec.name)
    else:
        key = hashlib.sha256(
            json.dumps([SOURCES_VERSION, spec.format, spec.field, tokenizer.fingerprint, _files_key(files)]).encode()
        ).hexdigest()[:16]
        out = cache / "sources" / f"{spec.name}-{key}"
        if not out.exists():
            tokens = tokenizer.encode_docs(_documents(spec, files))
            if tokens.size <= len(files):  # only end-of-document markers: every document was empty
                raise SourceError(
                    f"source '{spec.name}': its {len(files)} file(s) hold no text; point paths at non-empty data"
                )
            info: dict[str, Any] = {"name": spec.name, "format": spec.format, "files": [str(f) for f in files]}
            info["tokenizer"] = record_of(tokenizer).__dict__
            write_token_dir(out, tokens, info)
        read_manifest(out, verify=verify, what=f"token cache of source '{spec.name}'")
        stream = TokenStream(out / "data", name=spec.name)
    if stream.num_tokens == 0:
        raise SourceError(f"source '{spec.name}' is empty (0 tokens); point paths at non-empty data")
    return stream
