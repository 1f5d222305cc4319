"""Tokenizers for packing documents into one token stream per source.

Documents are concatenated with an end-of-document token after each (id 0 in both tokenizers), so
packed blocks can span documents and the model can learn where one ends.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
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


Tokenizer = ByteTokenizer | BPETokenizer
