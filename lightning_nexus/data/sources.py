"""User data sources (``SourceSpec``), their validation, and their conversion into token streams.

Text and JSONL sources are tokenized once into the cache (litdata token dirs, keyed by the input
files' paths, sizes and mtimes and by the tokenizer); ``format: litdata`` dirs are read in place.
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
from typing import Literal

from lightning_nexus.data.store import TokenStream, read_manifest, write_token_dir
from lightning_nexus.data.tokenizer import BPETokenizer, ByteTokenizer

SOURCES_VERSION = "1"
_ROLES = ("train", "ood")
_FORMATS = ("text", "jsonl", "litdata")


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
          jsonl_field: content
        - name: held_out
          paths: [/data/held_out_litdata]
          format: litdata
          role: ood
    """

    name: str
    """Source name: used in logged tags (``train/loss/<name>``, ``val/loss/<name>``)."""
    paths: list[str] = field(default_factory=list)
    """Files, directories (read recursively) or glob patterns (``**`` allowed); for ``litdata``: dataset dirs."""
    weight: float = 1.0
    """Relative share of training micro-batches (train sources only)."""
    role: Literal["train", "ood"] = "train"
    """``train``: trained on and validated; ``ood``: validation only (reported under ``val/loss/ood``)."""
    format: Literal["text", "jsonl", "litdata"] = "text"
    """``text``: each file is a document; ``jsonl``: one document per line; ``litdata``: pre-tokenized
    ``litdata.optimize(..., item_loader=TokensLoader())`` output."""
    jsonl_field: str = "text"
    """Field holding the document in each JSONL record."""


class SourceError(ValueError):
    """A source specification that cannot work; the message names the source and the fix."""


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
        if s.role not in _ROLES:
            raise SourceError(f"{where}: unknown role {s.role!r}; use one of {list(_ROLES)}")
        if s.format not in _FORMATS:
            raise SourceError(f"{where}: unknown format {s.format!r}; use one of {list(_FORMATS)}")
        if not isinstance(s.weight, (int, float)) or not math.isfinite(s.weight) or s.weight < 0:
            raise SourceError(f"{where}: weight {s.weight!r} must be a finite number >= 0")
        if isinstance(s.paths, str) or not s.paths:
            raise SourceError(f"{where}: paths must be a non-empty list of files, directories or globs")
    train = [s for s in specs if s.role == "train"]
    if not train:
        raise SourceError("no source has role 'train'; mark at least one source role: train")
    if all(s.weight <= 0 for s in train):
        raise SourceError(
            f"all train sources ({', '.join(s.name for s in train)}) have weight <= 0; give at least one a positive weight"
        )


def _has_magic(p: str) -> bool:
    return any(c in p for c in "*?[")


def expand_paths(spec: SourceSpec) -> list[Path]:
    """Files (or, for litdata, dataset dirs) of a source, in a stable order; raises if any path matches nothing."""
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
            if spec.format == "litdata":
                if mp.is_dir():
                    out.append(mp)
            elif mp.is_dir():
                out.extend(sorted(f for f in mp.rglob("*") if f.is_file() and not f.name.startswith(".")))
            elif mp.is_file():
                out.append(mp)
    if not out:
        kind = "litdata dataset directories" if spec.format == "litdata" else "files"
        raise SourceError(f"source '{spec.name}': paths {spec.paths} contain no {kind}; point paths at your data")
    return out


def _documents(spec: SourceSpec, files: list[Path]) -> Iterator[str]:
    for f in files:
        if spec.format == "text":
            yield f.read_text(encoding="utf-8", errors="replace")
            continue
        with open(f, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SourceError(
                        f"source '{spec.name}': {f}:{lineno} is not valid JSON ({err.msg}); fix or remove the line"
                    ) from err
                if not isinstance(rec, dict) or spec.jsonl_field not in rec:
                    raise SourceError(
                        f"source '{spec.name}': {f}:{lineno} has no field {spec.jsonl_field!r}; set jsonl_field to the field holding the text"
                    )
                yield str(rec[spec.jsonl_field])


def _files_key(files: list[Path]) -> list:
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def train_user_bpe(specs: list[SourceSpec], cache: Path, vocab_size: int, max_chars: int = 50_000_000) -> BPETokenizer:
    """A BPE tokenizer trained on (the first ``max_chars`` of) the text/JSONL train sources, cached."""
    text_train = [s for s in specs if s.role == "train" and s.format != "litdata"]
    if not text_train:
        raise SourceError("tokenizer='bpe' needs at least one text or jsonl train source to learn from")
    key = hashlib.sha256(
        json.dumps(
            [SOURCES_VERSION, vocab_size, max_chars]
            + [[s.name, s.format, s.jsonl_field, _files_key(expand_paths(s))] for s in text_train]
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


def resolve_source(
    spec: SourceSpec, tokenizer: ByteTokenizer | BPETokenizer, cache: Path, verify: bool = True
) -> TokenStream:
    """Turn a spec into a token stream, tokenizing text/JSONL into the cache the first time."""
    files = expand_paths(spec)
    if spec.format == "litdata":
        stream = TokenStream(files, name=spec.name)
    else:
        key = hashlib.sha256(
            json.dumps(
                [SOURCES_VERSION, spec.format, spec.jsonl_field, tokenizer.fingerprint, _files_key(files)]
            ).encode()
        ).hexdigest()[:16]
        out = cache / "sources" / f"{spec.name}-{key}"
        if not out.exists():
            tokens = tokenizer.encode_docs(_documents(spec, files))
            if tokens.size <= len(files):  # only end-of-document markers: every document was empty
                raise SourceError(
                    f"source '{spec.name}': its {len(files)} file(s) hold no text; point paths at non-empty data"
                )
            write_token_dir(out, tokens, {"name": spec.name, "format": spec.format, "files": [str(f) for f in files]})
        read_manifest(out, verify=verify, what=f"token cache of source '{spec.name}'")
        stream = TokenStream(out / "data", name=spec.name)
    if stream.num_tokens == 0:
        raise SourceError(f"source '{spec.name}' is empty (0 tokens); point paths at non-empty data")
    return stream
