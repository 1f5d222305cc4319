"""Downstream probes that need no download: accuracy on tasks the language model never trained on.

Both probes score *transfer*: the skill they test is learnable from the training sources, but the
items come in a form the model has never seen, so a model can only do well by having learned
something shared, not by recalling training text. They are cheap enough to run at every validation
(tiny GPT, one CPU thread: about 0.6 s and 1.2 s) and are pure functions of the model: fixed items
from a seed, no global RNG use, parameters and train/eval modes left as they were.

- :class:`ArithmeticTransferProbe`: few-shot single-digit addition in a layout absent from the
  ``math`` source, scored by ranking candidate answers by likelihood.
- :class:`GrammarDepthProbe`: a linear probe on frozen hidden states predicting each word's depth in
  the derivation tree of a *held-out* grammar (Liu et al. 2022, "Same pre-training loss, better
  downstream"): how much syntax-like structure the representations carry beyond the training data.

Models follow the recipes interface: ``model(idx [B, T]) -> logits [B, T, V]``; the grammar probe
also needs ``model.features(idx) -> hidden [B, T, d]`` (what the output head reads).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_accuracy

from lightning_nexus.data.generators import RandomPCFG
from lightning_nexus.data.tokenizer import BPETokenizer, ByteTokenizer
from lightning_nexus_recipes.evidence.modes import eval_mode

# Padded tokens per forward pass; logits also cap the batch so B*T*V stays near 64M floats.
_MAX_TOKENS = 4096
_MAX_LOGITS = 1 << 26


def encode_text(tokenizer: ByteTokenizer | BPETokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without the end-of-document token the tokenizers append."""
    return _encode_many(tokenizer, [text])[0]


def _encode_many(tokenizer: ByteTokenizer | BPETokenizer, texts: Sequence[str]) -> list[list[int]]:
    # One encode_docs call for all texts (fast for BPE), split again at the end-of-document ids.
    flat = tokenizer.encode_docs(texts)
    ends = np.flatnonzero(flat == tokenizer.eod_id)
    if len(ends) != len(texts):
        raise ValueError("a probe text encodes to the end-of-document id; probe texts must be plain text")
    starts = np.concatenate(([0], ends[:-1] + 1))
    return [flat[s:e].astype(np.int64).tolist() for s, e in zip(starts, ends)]


@contextmanager
def _frozen(model: nn.Module) -> Iterator[torch.device]:
    """Eval mode and no autograd for the duration; every module's own mode is restored afterwards
    (a model may be partly in eval mode on purpose)."""
    with eval_mode(model), torch.no_grad():
        yield next(model.parameters()).device


def _batches(rows: Sequence[Sequence[int]], max_tokens: int) -> Iterator[tuple[list[int], Tensor]]:
    """Right-padded batches of ``rows`` (indices into ``rows``, ids ``[B, T]``), grouped by length so
    little compute goes to padding. Right padding is harmless: causal models never look ahead."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) + 1) * len(rows[i]) > max_tokens:
            yield batch, _pad([rows[j] for j in batch])
            batch = []
        batch.append(i)
    if batch:
        yield batch, _pad([rows[j] for j in batch])


def _pad(rows: list[Sequence[int]]) -> Tensor:
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class ArithmeticTransferProbe:
    """Few-shot single-digit addition in an unseen layout; accuracy of the top-ranked answer.

    Each item is ``n_shots`` solved equations and a query, one per line::

        3 + 4 = 7
        0 + 6 = 6
        5 + 2 = 7
        1 + 1 = 2
        2 + 6 =

    Candidates are the answers ``" 0"`` ... ``" 9"``, ranked by the summed log-likelihood of their
    tokens; ties share the credit. The ten answers are equally frequent among the items, so both a
    model that cannot tell candidates apart and one that always picks the same digit score ``chance``
    = 0.1 (exactly when ``n_items`` is a multiple of 10).
    The ``math`` training source does single-digit sums constantly ("Q: ... A: 3+5+0=8, ... Answer:")
    but never as bare equation lines, so the score measures whether the arithmetic the model learned
    transfers to a new surface form it must pick up in context. Operands keep every sum a single
    digit: candidates then have equal length and none is a prefix of another, so no terminating
    newline is needed and one forward pass per item scores all ten (with the byte tokenizer). The
    query's pair (in either order) never appears among its shots, so copying cannot solve it.
    The probe needs a model that adds in the training layout first: a tiny GPT trained for 1500 steps
    of 2k tokens (a third of them math) still answers "1" after every "d+d+0=" step, and scores
    exactly chance here.

    Example::

        >>> from lightning_nexus.data.tokenizer import ByteTokenizer
        >>> from lightning_nexus_recipes.models import GPT, GPTConfig
        >>> probe = ArithmeticTransferProbe(n_items=8)
        >>> 0.0 <= probe(GPT(GPTConfig(size="tiny")), ByteTokenizer()) <= 1.0
        True
    """

    name = "arith_transfer"

    def __init__(self, n_items: int = 200, n_shots: int = 4, seed: int = 1234) -> None:
        pairs = [(a, b) for a in range(10) for b in range(10 - a)]
        if not 0 <= n_shots <= len(pairs) - 2:
            raise ValueError(f"ArithmeticTransferProbe: n_shots={n_shots} must be in [0, {len(pairs) - 2}]")
        if n_items < 1:
            raise ValueError(f"ArithmeticTransferProbe: n_items={n_items} must be >= 1")
        rng = random.Random(f"arith-transfer-{seed}")
        self.candidates: list[str] = [f" {s}" for s in range(10)]
        """Continuations scored after each prompt; item answers index into this list."""
        self.chance: float = 1.0 / len(self.candidates)
        self.items: list[tuple[str, int]] = []
        """``(prompt, answer)`` pairs, fixed by the seed."""
        for i in range(n_items):
            # Every answer equally often, so no constant guess (say, always the commonest sum) beats chance.
            a, b = rng.choice([p for p in pairs if sum(p) == i % 10])
            shots = rng.sample([p for p in pairs if p not in ((a, b), (b, a))], n_shots)
            prompt = "".join(f"{x} + {y} = {x + y}\n" for x, y in shots) + f"{a} + {b} ="
            self.items.append((prompt, a + b))

    def __call__(self, model: nn.Module, tokenizer: ByteTokenizer | BPETokenizer) -> float:
        """Accuracy in [0, 1] of ``model`` (logits ``[B, T, V]``) on the fixed items."""
        prompts = _encode_many(tokenizer, [p for p, _ in self.items])
        conts = _encode_many(tokenizer, self.candidates)
        # Candidates sharing all but their last token are scored from one row: prompt + that prefix.
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, c in enumerate(conts):
            groups.setdefault(tuple(c[:-1]), []).append(k)
        rows: list[list[int]] = []
        targets: list[list[tuple[int, int, int, int]]] = []  # per row: (position, token, item, candidate)
        for i, p in enumerate(prompts):
            for prefix, members in groups.items():
                rows.append(p + list(prefix))
                targets.append([(len(p) - 1 + j, t, i, k) for k in members for j, t in enumerate(conts[k])])

        scores = torch.zeros(len(self.items), len(self.candidates), dtype=torch.float64)
        max_tokens = max(16, min(_MAX_TOKENS, _MAX_LOGITS // tokenizer.vocab_size))
        with _frozen(model) as device:
            for batch, ids in _batches(rows, max_tokens):
                logits = model(ids.to(device))
                b, pos, tok, item, cand = (
                    torch.tensor(col) for col in zip(*[(n, *t) for n, r in enumerate(batch) for t in targets[r]])
                )
                logp = logits[b.to(device), pos.to(device)].float().log_softmax(-1)
                picked = logp.gather(1, tok.to(device)[:, None]).squeeze(1).double().cpu()
                scores.index_put_((item, cand), picked, accumulate=True)

        answers = torch.tensor([a for _, a in self.items])
        best = scores == scores.max(dim=1, keepdim=True).values
        credit = best[torch.arange(len(answers)), answers].double() / best.sum(dim=1)
        return float(credit.mean())


class GrammarDepthProbe:
    """Linear probe on frozen hidden states: each word's depth in the parse of a held-out grammar.

    Sentences come from ``RandomPCFG(grammar_seed)``; with the default ``grammar_seed=2`` that is the
    ``grammar_ood`` source, whose rules and words the model never trains on (it trains on grammar 1,
    same style). For every word, the final hidden state at its last token is the feature and its
    derivation depth, bucketed into ``<=2``, ``3``, ``>=4`` (about 37/32/31% of the words of
    grammar 2), is the label. A multinomial logistic regression is fitted on the train sentences and
    its test accuracy is returned. Depth is contextual (the same word sits at different depths in
    different sentences), so the probe asks how much reusable structure the representations extract
    from an unseen language: the property Liu et al. (2022) found to separate models with the same
    pre-training loss. Two reference points come with the probe: ``chance``, the majority-class
    accuracy of the test words, and ``lexical_baseline``, the accuracy of predicting each test word's
    commonest class among the train words (word identity alone, no context). Scores above
    ``lexical_baseline`` need context. Untrained tiny GPTs score 0.455 +- 0.004 (4 inits; chance 0.351,
    lexical baseline 0.574 with the defaults): random features already carry some word identity.

    The fit is deterministic: standardized float64 features, zero initialization, a fixed number of
    full-batch L-BFGS iterations (``iters``; not always to convergence, which regularizes too) and an
    L2 penalty ``l2``. Sentences are prefixed with a newline, as they are in the corpus, and cut after
    ``max_chars`` characters (whole words only), which keeps every sequence well inside the model's
    context and makes labels independent of the tokenizer.

    Example::

        >>> from lightning_nexus.data.tokenizer import ByteTokenizer
        >>> from lightning_nexus_recipes.models import GPT, GPTConfig
        >>> probe = GrammarDepthProbe(n_train=20, n_test=10)
        >>> 0.0 <= probe(GPT(GPTConfig(size="tiny")), ByteTokenizer()) <= 1.0
        True
    """

    name = "grammar_depth"
    n_classes = 3

    def __init__(
        self,
        n_train: int = 200,
        n_test: int = 100,
        seed: int = 1234,
        grammar_seed: int = 2,
        max_chars: int = 64,
        l2: float = 1e-3,
        iters: int = 100,
    ) -> None:
        if n_train < 1 or n_test < 1:
            raise ValueError(f"GrammarDepthProbe: n_train={n_train} and n_test={n_test} must be >= 1")
        grammar = RandomPCFG(grammar_seed)
        rng = random.Random(f"grammar-depth-{seed}")
        self.l2, self.iters = l2, iters
        self.sentences: list[tuple[list[str], list[int]]] = []
        """Per sentence: its text in chunks (``"\\n"``, then one chunk per word with its leading space)
        and the depth class of each word chunk; train sentences first, then test."""
        seen: set[str] = set()
        # Distinct texts, so no test sentence is also a train sentence.
        while len(self.sentences) < n_train + n_test:
            text, depths = grammar.tagged_sentence(rng)
            if text in seen:
                continue
            seen.add(text)
            chunks, labels, length = ["\n"], [], 1
            for n, word in enumerate(text.split(" ")[: len(depths)]):
                chunk = word if n == 0 else " " + word
                length += len(chunk)
                if length > max_chars:
                    break
                chunks.append(chunk)
                labels.append(self.depth_class(depths[n]))
            if labels:
                self.sentences.append((chunks, labels))
        self.n_train = n_train
        train, test = self._words(self.sentences[:n_train]), self._words(self.sentences[n_train:])
        test_counts = Counter(c for _, c in test)
        self.chance: float = max(test_counts.values()) / len(test)
        by_word: dict[str, Counter[int]] = {}
        for word, c in train:
            by_word.setdefault(word, Counter())[c] += 1
        train_major = Counter(c for _, c in train).most_common(1)[0][0]
        guess = {word: counts.most_common(1)[0][0] for word, counts in by_word.items()}
        self.lexical_baseline: float = sum(guess.get(w, train_major) == c for w, c in test) / len(test)
        """Test accuracy of "each word's commonest train class" (unseen words: the commonest class)."""

    @staticmethod
    def _words(sentences: list[tuple[list[str], list[int]]]) -> list[tuple[str, int]]:
        return [(chunk.strip().lower(), c) for chunks, labels in sentences for chunk, c in zip(chunks[1:], labels)]

    @staticmethod
    def depth_class(depth: int) -> int:
        """Bucket of a derivation depth: 0 for <=2, 1 for 3, 2 for >=4."""
        return min(max(depth - 2, 0), 2)

    def __call__(self, model: nn.Module, tokenizer: ByteTokenizer | BPETokenizer) -> float:
        """Test accuracy in [0, 1] of the linear probe on ``model.features``."""
        # Chunks are encoded separately: BPE pre-tokenizes at spaces anyway, so the ids equal those of
        # the whole text, and each word's last token is known without offsets.
        encoded = _encode_many(tokenizer, [c for chunks, _ in self.sentences for c in chunks])
        rows: list[list[int]] = []
        word_ends: list[list[int]] = []
        at = 0
        for chunks, _ in self.sentences:
            pieces = encoded[at : at + len(chunks)]
            at += len(chunks)
            rows.append([t for piece in pieces for t in piece])
            word_ends.append(np.cumsum([len(piece) for piece in pieces])[1:].tolist())

        feats: list[Tensor] = [torch.empty(0)] * len(rows)
        with _frozen(model) as device:
            for batch, ids in _batches(rows, _MAX_TOKENS):
                hidden = cast(Any, model).features(ids.to(device))  # the recipe models' hidden states
                b = torch.tensor([n for n, r in enumerate(batch) for _ in word_ends[r]], device=device)
                pos = torch.tensor([end - 1 for r in batch for end in word_ends[r]], device=device)
                picked = hidden[b, pos].to("cpu", torch.float64)
                for r, part in zip(batch, picked.split([len(word_ends[r]) for r in batch])):
                    feats[r] = part
        x_train = torch.cat(feats[: self.n_train])
        x_test = torch.cat(feats[self.n_train :])
        y = [torch.tensor(labels) for _, labels in self.sentences]
        y_train, y_test = torch.cat(y[: self.n_train]), torch.cat(y[self.n_train :])

        mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
        weight, bias = self._fit((x_train - mean) / std, y_train)
        logits = ((x_test - mean) / std) @ weight + bias
        return float(multiclass_accuracy(logits, y_test, num_classes=self.n_classes, average="micro"))

    def _fit(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return fit_logistic(x, y, self.n_classes, self.l2, self.iters)


def fit_logistic(x: Tensor, y: Tensor, n_classes: int, l2: float, iters: int) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression with L2 on the weights, from zeros for ``iters`` full-batch L-BFGS
    iterations (deterministic); returns ``(weight [d, n_classes], bias [n_classes])``."""
    weight = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=iters,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    # One thread: at this size the thread pool costs more than it saves (tens of times more on a
    # busy machine), and the fitted probe no longer depends on the machine's thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return weight.detach(), bias.detach()
