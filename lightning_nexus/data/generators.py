"""Seeded text generators for the embedded corpus: arithmetic with worked solutions and random
probabilistic context-free grammars (the synthetic-language setting of Liu et al. 2022, "Same
pre-training loss, better downstream"). Pure Python ``random.Random`` so the output is identical
on every machine and Python version we support."""

from __future__ import annotations

import random
from collections.abc import Iterator

GENERATORS_VERSION = "1"


def _arith_problem(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:  # a + b * c with precedence spelled out
        a, b, c = rng.randrange(1, 100), rng.randrange(2, 20), rng.randrange(2, 20)
        op = rng.choice("+-")
        bc = b * c
        res = a + bc if op == "+" else a - bc
        return f"Q: {a} {op} {b} * {c} = ?\nA: {b} * {c} = {bc}. {a} {op} {bc} = {res}. Answer: {res}\n"
    if kind == 1:  # linear equation
        x, a, b = rng.randrange(-20, 21), rng.randrange(2, 13), rng.randrange(-50, 51)
        c = a * x + b
        sb = f"+ {b}" if b >= 0 else f"- {-b}"
        return (
            f"Q: Solve {a}x {sb} = {c}.\nA: {a}x = {c} {'-' if b >= 0 else '+'} {abs(b)} = {c - b}. "
            f"x = {c - b} / {a} = {x}. Answer: x = {x}\n"
        )
    if kind == 2:  # long addition with carries
        a, b = rng.randrange(100, 100000), rng.randrange(100, 100000)
        steps, carry, digits = [], 0, []
        sa, sb = str(a)[::-1], str(b)[::-1]
        for i in range(max(len(sa), len(sb))):
            da = int(sa[i]) if i < len(sa) else 0
            db = int(sb[i]) if i < len(sb) else 0
            s = da + db + carry
            steps.append(f"{da}+{db}+{carry}={s}")
            digits.append(str(s % 10))
            carry = s // 10
        if carry:
            digits.append(str(carry))
        return f"Q: {a} + {b} = ?\nA: {', '.join(steps)}. Answer: {''.join(reversed(digits))}\n"
    # remainder / division
    b = rng.randrange(2, 30)
    q, r = rng.randrange(1, 200), None
    r = rng.randrange(0, b)
    a = b * q + r
    return f"Q: {a} divided by {b}?\nA: {b} * {q} = {b * q}. {a} - {b * q} = {r}. Answer: {q} remainder {r}\n"


def arithmetic_docs(seed: int, max_bytes: int) -> Iterator[str]:
    """Documents of 8-32 worked arithmetic problems each."""
    rng = random.Random(f"arith-{seed}")
    total = 0
    while total < max_bytes:
        doc = "".join(_arith_problem(rng) for _ in range(rng.randrange(8, 33)))
        total += len(doc)
        yield doc


class RandomPCFG:
    """A random PCFG over invented words.

    Nonterminal ``i`` only rewrites into nonterminals ``j > i`` or preterminals, so every derivation
    terminates; preterminals emit words from their own Zipf-weighted slice of the vocabulary. Two
    grammars with different seeds share the style but neither rules nor vocabulary: a held-out
    grammar is a clean "same kind of data, different distribution" OOD source.
    """

    def __init__(self, seed: int, n_nonterminals: int = 14, n_preterminals: int = 24, n_words: int = 400) -> None:
        rng = random.Random(f"pcfg-{seed}")
        syll = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
        words: set[str] = set()
        while len(words) < n_words:
            words.add("".join(rng.choice(syll) for _ in range(rng.randrange(1, 4))))
        vocab = sorted(words)
        rng.shuffle(vocab)
        per = n_words // n_preterminals
        self.pre = [vocab[k * per : (k + 1) * per] for k in range(n_preterminals)]
        self.pre_w = [[1.0 / (r + 1) for r in range(per)] for _ in range(n_preterminals)]
        self.rules: list[list[list[tuple[str, int]]]] = []
        self.rule_w: list[list[float]] = []
        for i in range(n_nonterminals):
            rules = []
            for _ in range(rng.randrange(2, 5)):
                rhs = []
                # Upper levels get longer, more recursive rules so sentences have real structure.
                shallow = i < n_nonterminals // 3
                for _ in range(rng.randrange(2, 4) if shallow else rng.randrange(1, 4)):
                    if i + 1 < n_nonterminals and rng.random() < (0.7 if shallow else 0.35):
                        rhs.append(("N", rng.randrange(i + 1, n_nonterminals)))
                    else:
                        rhs.append(("P", rng.randrange(n_preterminals)))
                rules.append(rhs)
            self.rules.append(rules)
            self.rule_w.append([rng.random() + 0.1 for _ in rules])

    def sentence(self, rng: random.Random) -> str:
        out: list[str] = []
        stack: list[tuple[str, int]] = [("N", 0)]
        while stack:
            kind, idx = stack.pop()
            if kind == "P":
                out.append(rng.choices(self.pre[idx], self.pre_w[idx])[0])
            else:
                rhs = rng.choices(self.rules[idx], self.rule_w[idx])[0]
                stack.extend(reversed(rhs))
        return " ".join(out).capitalize() + " ."

    def tagged_sentence(self, rng: random.Random) -> tuple[str, list[int]]:
        """``sentence(rng)`` together with each word's depth in the derivation tree.

        A word's depth is the number of nonterminals on its path from the root: words that the start
        symbol's rule emits directly have depth 1. Consumes ``rng`` exactly as ``sentence`` does, so
        the text equals ``sentence``'s for the same generator state (the corpus is unchanged).
        """
        words: list[str] = []
        depths: list[int] = []
        stack: list[tuple[str, int, int]] = [("N", 0, 0)]
        while stack:
            kind, idx, depth = stack.pop()
            if kind == "P":
                words.append(rng.choices(self.pre[idx], self.pre_w[idx])[0])
                depths.append(depth)
            else:
                rhs = rng.choices(self.rules[idx], self.rule_w[idx])[0]
                stack.extend((k, i, depth + 1) for k, i in reversed(rhs))
        return " ".join(words).capitalize() + " .", depths


def pcfg_docs(grammar_seed: int, seed: int, max_bytes: int) -> Iterator[str]:
    """Paragraph documents of 4-16 sentences from ``RandomPCFG(grammar_seed)``."""
    g = RandomPCFG(grammar_seed)
    rng = random.Random(f"pcfg-sample-{grammar_seed}-{seed}")
    total = 0
    while total < max_bytes:
        doc = "\n".join(g.sentence(rng) for _ in range(rng.randrange(4, 17))) + "\n"
        total += len(doc)
        yield doc
