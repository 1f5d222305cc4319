"""The embedded mixed-source corpus: built offline from files every Debian/Python machine has and
from seeded generators, written with ``litdata.optimize`` into a versioned cache directory.

Train sources: ``code`` (Python standard library), ``prose`` (license texts, /usr/share/doc
READMEs, falling back to stdlib docstrings), ``math`` (arithmetic with worked solutions),
``formal`` (a random PCFG language). OOD sources: ``grammar_ood`` (a held-out PCFG: same style,
other rules and words), and ``c_headers`` (/usr/include) where the machine has C headers.

The cache key hashes the corpus version, the build arguments, the tokenizer and the list of input
files with their sizes and mtimes, so the corpus is rebuilt exactly when one of them changes.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning_nexus.data.generators import GENERATORS_VERSION, arithmetic_docs, pcfg_docs
from lightning_nexus.data.store import MANIFEST, CorruptCacheError, make_build_dir, read_manifest, write_token_dir
from lightning_nexus.data.tokenizer import BPETokenizer, ByteTokenizer

# Bump when the corpus recipe (selection, generators, layout) changes: old caches are then ignored.
CORPUS_VERSION = "1"
DEFAULT_BYTES_PER_SOURCE = 2_000_000
CACHE_ENV = "LIGHTNING_NEXUS_CACHE"


def default_cache_dir() -> Path:
    """``$LIGHTNING_NEXUS_CACHE``, else ``$XDG_CACHE_HOME/lightning_nexus``, else ``~/.cache/lightning_nexus``."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_nexus"


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(f"[lightning_nexus.data] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# File-based sources: pick files deterministically (sorted walk), stop at the byte budget.


def _walk(root: Path, accept: Callable[[Path], bool]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink() and accept(p):
                yield p


def _select(paths: Iterator[Path], max_bytes: int) -> list[Path]:
    out, total = [], 0
    for p in paths:
        size = p.stat().st_size
        if size == 0 or size > max_bytes:
            continue
        out.append(p)
        total += size
        if total >= max_bytes:
            break
    return out


def _read_text(p: Path) -> str:
    data = p.read_bytes()
    if p.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _code_files(max_bytes: int) -> list[Path]:
    root = _stdlib()
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}
    return _select(_walk(root, lambda p: p.suffix == ".py" and not (set(p.relative_to(root).parts) & skip)), max_bytes)


def _prose_files(max_bytes: int) -> list[Path]:
    licenses = (
        list(_walk(Path("/usr/share/common-licenses"), lambda p: True))
        if Path("/usr/share/common-licenses").is_dir()
        else []
    )

    def doc_ok(p: Path) -> bool:
        n = p.name.lower()
        return n.startswith(("readme", "news", "copyright")) and p.suffix in ("", ".gz", ".txt", ".md", ".debian")

    docs = list(_walk(Path("/usr/share/doc"), doc_ok)) if Path("/usr/share/doc").is_dir() else []
    return _select(iter(licenses + docs), max_bytes)


def _header_files(max_bytes: int) -> list[Path]:
    root = Path("/usr/include")
    return _select(_walk(root, lambda p: p.suffix == ".h"), max_bytes) if root.is_dir() else []


def _docstrings(max_bytes: int) -> Iterator[str]:
    """Module/class/function docstrings of the stdlib: prose that exists wherever Python does."""
    total = 0
    for p in _code_files(50 * max_bytes):
        try:
            tree = ast.parse(p.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        parts = [
            d
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and (d := ast.get_docstring(node))
            and len(d) > 80
        ]
        if parts:
            doc = "\n\n".join(parts) + "\n"
            total += len(doc)
            yield doc
            if total >= max_bytes:
                return


@dataclass
class _SourcePlan:
    name: str
    role: Literal["train", "ood"]
    origin: str  # human-readable, goes into the manifest
    files: list[Path] = field(default_factory=list)
    docs: Callable[[], Iterator[str]] | None = None  # generator-backed sources
    fallback_docs: Callable[[], Iterator[str]] | None = None  # used when files are too few

    def documents(self) -> Iterator[str]:
        for p in self.files:
            yield _read_text(p)
        if self.docs is not None:
            yield from self.docs()
        if self.fallback_docs is not None:
            yield from self.fallback_docs()

    def fingerprint(self) -> list:
        return [self.name, self.role, self.origin] + [
            [str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in self.files
        ]


def _plan(max_bytes: int, seed: int) -> list[_SourcePlan]:
    plans = [
        _SourcePlan("code", "train", "python stdlib", files=_code_files(max_bytes)),
    ]
    prose_files = _prose_files(max_bytes)
    prose_bytes = sum(p.stat().st_size for p in prose_files)
    prose = _SourcePlan("prose", "train", "licenses + /usr/share/doc", files=prose_files)
    if prose_bytes < max_bytes // 2:  # slim images ship almost no docs: top up with docstrings
        prose.origin += " + stdlib docstrings"
        prose.fallback_docs = lambda: _docstrings(max_bytes - prose_bytes)
    plans.append(prose)
    plans.append(
        _SourcePlan("math", "train", f"generator v{GENERATORS_VERSION}", docs=lambda: arithmetic_docs(seed, max_bytes))
    )
    plans.append(
        _SourcePlan(
            "formal", "train", f"pcfg v{GENERATORS_VERSION} grammar 1", docs=lambda: pcfg_docs(1, seed, max_bytes)
        )
    )
    plans.append(
        _SourcePlan(
            "grammar_ood", "ood", f"pcfg v{GENERATORS_VERSION} grammar 2", docs=lambda: pcfg_docs(2, seed, max_bytes)
        )
    )
    headers = _header_files(max_bytes)
    if sum(p.stat().st_size for p in headers) >= max_bytes // 4:
        plans.append(_SourcePlan("c_headers", "ood", "/usr/include", files=headers))
    return plans


@dataclass
class CorpusSource:
    name: str
    role: Literal["train", "ood"]
    path: Path  # litdata dir
    num_tokens: int


@dataclass
class EmbeddedCorpus:
    """A built corpus: where it lives, its sources and its tokenizer."""

    root: Path
    sources: list[CorpusSource]
    tokenizer: str  # "byte" or path of the BPE tokenizer.json
    vocab_size: int


def _truncate_docs(docs: Iterator[str], max_bytes: int) -> Iterator[str]:
    total = 0
    for d in docs:
        if total >= max_bytes:
            return
        d = d[: max_bytes - total]
        total += len(d)
        yield d


def build_embedded_corpus(
    cache_dir: str | os.PathLike | None = None,
    max_bytes_per_source: int = DEFAULT_BYTES_PER_SOURCE,
    tokenizer: Literal["byte", "bpe"] = "byte",
    bpe_vocab_size: int = 4096,
    seed: int = 0,
    verbose: bool = True,
    verify: bool = True,
) -> EmbeddedCorpus:
    """Build (or find in the cache) the embedded corpus and return its description.

    Args:
        cache_dir: parent directory of the cache; default ``default_cache_dir()``.
        max_bytes_per_source: text budget per source, in characters (tests use ~50 kB).
        tokenizer: ``"byte"`` (vocab 256) or ``"bpe"`` (trained here on the train sources).
        bpe_vocab_size: vocabulary size of the BPE tokenizer.
        seed: seed of the generated sources (changes their content, hence the cache key).
        verbose: print progress to stderr.
        verify: check every cached file against the manifest's SHA-256 before use.

    Example::

        >>> corpus = build_embedded_corpus("/tmp/ln-doc-cache", max_bytes_per_source=20_000, verbose=False)
        >>> [s.name for s in corpus.sources][:4]
        ['code', 'prose', 'math', 'formal']
    """
    if tokenizer not in ("byte", "bpe"):
        raise ValueError(f"tokenizer must be 'byte' or 'bpe', got {tokenizer!r}")
    if max_bytes_per_source < 1000:
        raise ValueError(
            f"max_bytes_per_source={max_bytes_per_source} is too small to build a useful corpus (use >= 1000)"
        )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    plans = _plan(max_bytes_per_source, seed)
    key_src = json.dumps(
        [CORPUS_VERSION, max_bytes_per_source, tokenizer, bpe_vocab_size if tokenizer == "bpe" else None, seed]
        + [p.fingerprint() for p in plans]
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    root = cache / f"corpus-v{CORPUS_VERSION}-{tokenizer}-{key}"
    if not root.exists():
        _build(root, plans, max_bytes_per_source, tokenizer, bpe_vocab_size, verbose)
    else:
        _log(f"using cached corpus {root}", verbose)
    return _load(root, verify)


def _build(root: Path, plans: list[_SourcePlan], max_bytes: int, tokenizer: str, bpe_vocab: int, verbose: bool) -> None:
    t0 = time.perf_counter()
    _log(f"building embedded corpus ({len(plans)} sources, <= {max_bytes / 1e6:.1f} MB each) into {root}", verbose)
    tmp = make_build_dir(root)
    try:
        texts: dict[str, list[str]] = {}
        for p in plans:
            texts[p.name] = list(_truncate_docs(p.documents(), max_bytes))
            _log(f"  read {p.name:12s} {sum(map(len, texts[p.name])) / 1e6:6.2f} MB from {p.origin}", verbose)
        if tokenizer == "bpe":
            _log(f"  training BPE tokenizer (vocab {bpe_vocab}) on the train sources", verbose)
            train_docs = [d for p in plans if p.role == "train" for d in texts[p.name]]
            tok: ByteTokenizer | BPETokenizer = BPETokenizer.train(train_docs, bpe_vocab, tmp / "tokenizer.json")
        else:
            tok = ByteTokenizer()
        entries: list[dict[str, Any]] = []
        for p in plans:
            ids = tok.encode_docs(texts.pop(p.name))
            if ids.size == 0:
                raise RuntimeError(f"embedded source '{p.name}' came out empty ({p.origin})")
            write_token_dir(tmp / p.name, ids, {"name": p.name, "role": p.role, "origin": p.origin})
            entries.append({"name": p.name, "role": p.role, "num_tokens": int(ids.size), "origin": p.origin})
            _log(f"  wrote {p.name:12s} {ids.size / 1e6:6.2f} M tokens  ({time.perf_counter() - t0:.1f}s)", verbose)
        files = {}
        if tokenizer == "bpe":
            files["tokenizer.json"] = hashlib.sha256((tmp / "tokenizer.json").read_bytes()).hexdigest()
        for e in entries:  # a source dir's own manifest covers its chunks; hash the manifest
            files[f"{e['name']}/{MANIFEST}"] = hashlib.sha256((tmp / e["name"] / MANIFEST).read_bytes()).hexdigest()
        manifest = {
            "corpus_version": CORPUS_VERSION,
            "tokenizer": tokenizer,
            "vocab_size": tok.vocab_size,
            "sources": entries,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / MANIFEST).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    _log(f"corpus built in {time.perf_counter() - t0:.1f}s, {size / 1e6:.1f} MB on disk", verbose)


def _load(root: Path, verify: bool) -> EmbeddedCorpus:
    what = "embedded corpus cache"
    manifest = read_manifest(root, verify=verify, what=what)
    sources = []
    for e in manifest["sources"]:
        # the corpus manifest covers the source dirs: repairing one means rebuilding the whole corpus
        sub = read_manifest(root / e["name"], verify=verify, what=f"{what}, source '{e['name']}'", rebuild=root)
        if sub.get("num_tokens") != e["num_tokens"]:
            raise CorruptCacheError(
                f"{what}: source '{e['name']}' disagrees with {root / MANIFEST}; delete {root} to rebuild"
            )
        sources.append(CorpusSource(e["name"], e["role"], root / e["name"] / "data", e["num_tokens"]))
    tok = str(root / "tokenizer.json") if manifest["tokenizer"] == "bpe" else "byte"
    return EmbeddedCorpus(root, sources, tok, int(manifest["vocab_size"]))
