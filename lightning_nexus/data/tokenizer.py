"""Tokenizers for packing documents into one token stream per source.

Documents are concatenated with an end-of-document token after each (id 0 in both tokenizers), so
packed blocks can span documents and the model can learn where one ends.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EOD_ID = 0


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256). Byte 0 marks the end of a document: NUL never occurs in
    text we keep (it is stripped), so the marker is unambiguous without enlarging the vocab."""

    vocab_size = 256
    eod_id = EOD_ID
    fingerprint = "byte-v1"

    def encode_docs(self, docs: Iterable[str]) -> np.ndarray:
        parts = [d.encode("utf-8", errors="replace").replace(b"\0", b"") + b"\0" for d in docs]
        return np.frombuffer(b"".join(parts), dtype=np.uint8).copy()

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE (HuggingFace ``tokenizers``), trained offline on the training sources."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        self.path = Path(path)
        self._tok = Tokenizer.from_file(str(self.path))
        self.vocab_size = self._tok.get_vocab_size()
        self.eod_id = EOD_ID
        self.fingerprint = "bpe-" + hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    @staticmethod
    def train(docs: Iterable[str], vocab_size: int, path: str | Path) -> BPETokenizer:
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        except ImportError as err:  # pragma: no cover - tokenizers ships in the dev environment
            raise ImportError("tokenizer='bpe' needs the `tokenizers` package: pip install tokenizers") from err
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],  # first special token gets id 0 == EOD_ID
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(docs, trainer=trainer)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tok.save(str(tmp))
        tmp.replace(path)
        return BPETokenizer(path)

    def encode_docs(self, docs: Iterable[str]) -> np.ndarray:
        dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.uint32
        out: list[np.ndarray] = []
        for enc in self._tok.encode_batch([d.replace("\0", "") for d in docs]):
            out.append(np.asarray(enc.ids + [EOD_ID], dtype=dtype))
        return np.concatenate(out) if out else np.zeros(0, dtype=dtype)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


# Special tokens that mark the end of a document in common pretrained tokenizers, in lookup order.
_EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")


class HFTokenizer:
    """A pretrained Hugging Face ``tokenizer.json`` (the ``tokenizers`` library).

    Documents end with the tokenizer's own end-of-text token (the first of ``_EOD_TOKENS`` it has).
    """

    def __init__(self, path: str | Path) -> None:
        from lightning_nexus.data.formats import require

        tokenizers = require("tokenizers", "bpe", "a tokenizer.json tokenizer")
        self.path = Path(path).expanduser()
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"tokenizer {self.path} is not a Hugging Face tokenizer.json ({err})") from err
        self.vocab_size = self._tok.get_vocab_size()
        ids = [self._tok.token_to_id(t) for t in _EOD_TOKENS]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(
                f"tokenizer {self.path} has none of the end-of-text tokens {list(_EOD_TOKENS)}; "
                "add one as a special token so packed documents stay separated"
            )
        self.eod_id = found[0]
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.fingerprint = "hf-" + self.sha256[:16]

    def encode_docs(self, docs: Iterable[str]) -> np.ndarray:
        dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.uint32
        out = [np.asarray(enc.ids + [self.eod_id], dtype=dtype) for enc in self._tok.encode_batch(list(docs))]
        return np.concatenate(out) if out else np.zeros(0, dtype=dtype)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


Tokenizer = ByteTokenizer | BPETokenizer | HFTokenizer


@dataclass(frozen=True)
class TokenizerRecord:
    """What a source's token ids mean: two sources can share a run only if their records are equal."""

    kind: str
    """``byte``, ``bpe`` (trained for this run), ``hf`` (a tokenizer.json) or ``named`` (stated by name only)."""
    vocab_size: int | None
    sha256: str | None
    """Hash of the tokenizer file (``bpe``/``hf``)."""
    name: str = ""

    def describe(self) -> str:
        if self.kind == "byte":
            return "byte (vocab 256)"
        if self.kind == "named":
            return f"{self.name!r} (stated by name)"
        return f"{self.kind} {self.name} (vocab {self.vocab_size}, sha256 {str(self.sha256)[:12]})"

    def same_ids(self, other: TokenizerRecord) -> bool:
        if self.kind == "named" or other.kind == "named":
            return self.kind == other.kind and self.name == other.name
        return (self.vocab_size, self.sha256) == (other.vocab_size, other.sha256)


def record_of(tok: Tokenizer) -> TokenizerRecord:
    """The record of a tokenizer object."""
    if isinstance(tok, ByteTokenizer):
        return TokenizerRecord("byte", 256, None, "byte")
    kind = "hf" if isinstance(tok, HFTokenizer) else "bpe"
    digest = tok.sha256 if isinstance(tok, HFTokenizer) else hashlib.sha256(tok.path.read_bytes()).hexdigest()
    return TokenizerRecord(kind, int(tok.vocab_size), digest, str(tok.path))


def stated_record(value: str) -> TokenizerRecord:
    """The record of a ``tokenizer:`` stated for pre-tokenized data: ``byte``, a tokenizer.json path, or a name."""
    if value == "byte":
        return record_of(ByteTokenizer())
    if value.endswith(".json") or os.path.sep in value:
        return record_of(HFTokenizer(value))
    return TokenizerRecord("named", None, None, value)
