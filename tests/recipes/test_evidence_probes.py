"""Downstream probes of the evidence experiment: scoring against oracle and uniform models, chance
levels, determinism, no side effects, and the derivation depths they rest on."""

import itertools
import random
import re

import numpy as np
import pytest
import torch
from torch import nn

from lightning_nexus.data.generators import RandomPCFG, arithmetic_docs
from lightning_nexus.data.tokenizer import BPETokenizer, ByteTokenizer
from lightning_nexus_recipes.evidence.probes import ArithmeticTransferProbe, GrammarDepthProbe, encode_text
from lightning_nexus_recipes.models import GPT, GPTConfig, Llama, LlamaConfig

EQUATION_LINE = re.compile(r"^(\d) \+ (\d) = (\d+)$")


class TextLM(nn.Module):
    """A byte-level "language model" whose next-token logits are a function of the text so far."""

    def __init__(self, next_char) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the probes a device to read
        self.next_char = next_char

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, 256) + 0 * self.anchor
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                char = self.next_char(bytes(row[: t + 1]).decode())
                if char is not None:
                    logits[b, t, ord(char)] = 50.0
        return logits


def arithmetic(shift: int):
    """Next char of an adder that answers (a + b + shift) mod 10 after "a + b =" (shift 0: always right)."""

    def next_char(text: str):
        if m := re.search(r"(\d) \+ (\d) =( ?)$", text):
            return str((int(m[1]) + int(m[2]) + shift) % 10) if m[3] else " "
        return None

    return next_char


class WordFeatures(nn.Module):
    """Byte-level features that one-hot encode, at each word's last byte, either the word's depth class
    (looked up from the probe's own labels: an oracle) or the word itself (context-free features)."""

    def __init__(self, probe: GrammarDepthProbe, oracle: bool) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.oracle = oracle
        self.labels = {"".join(chunks): labels for chunks, labels in probe.sentences}
        vocab = sorted({c.strip().lower() for chunks, _ in probe.sentences for c in chunks[1:]})
        self.word_id = {w: i for i, w in enumerate(vocab)}

    def features(self, idx):
        out = torch.zeros(*idx.shape, len(self.word_id))
        for b, row in enumerate(idx.tolist()):
            text = bytes(t for t in row if t).decode()
            words = list(re.finditer(r"\S+", text))
            for m, label in zip(words, self.labels[text], strict=True):
                out[b, m.end() - 1, label if self.oracle else self.word_id[m[0].lower()]] = 1.0
        return out


@pytest.fixture(scope="module")
def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(size="tiny"))


# --- arithmetic -------------------------------------------------------------------------------


def test_arithmetic_items_are_well_formed_and_unseen_in_training_layout():
    probe = ArithmeticTransferProbe(n_items=50, n_shots=4, seed=7)
    assert probe.chance == pytest.approx(0.1) and len(probe.items) == 50
    for prompt, answer in probe.items:
        *shots, query = prompt.split("\n")
        assert len(shots) == 4
        pairs = []
        for line in shots:
            a, b, c = map(int, EQUATION_LINE.match(line).groups())
            assert a + b == c <= 9
            pairs.append((a, b))
        a, b = map(int, re.fullmatch(r"(\d) \+ (\d) =", query).groups())
        assert a + b == answer <= 9 and (a, b) not in pairs and (b, a) not in pairs
    # The layout is new: no line of the training math source is a bare equation.
    lines = [line for doc in itertools.islice(arithmetic_docs(0, 10**9), 300) for line in doc.split("\n")]
    assert lines and not any(EQUATION_LINE.match(line) for line in lines)
    assert np.bincount([answer for _, answer in probe.items]).tolist() == [5] * 10


def test_arithmetic_oracle_is_perfect_uniform_is_chance_wrong_adder_scores_zero():
    probe = ArithmeticTransferProbe(n_items=30)
    tok = ByteTokenizer()
    assert probe(TextLM(arithmetic(0)), tok) == 1.0
    assert probe(TextLM(lambda text: None), tok) == pytest.approx(probe.chance)  # ties share the credit
    assert probe(TextLM(arithmetic(1)), tok) == 0.0
    always_nine = TextLM(lambda text: "9" if text.endswith("= ") else " " if text.endswith("=") else None)
    assert probe(always_nine, tok) == pytest.approx(probe.chance)  # answers are balanced


def test_arithmetic_scores_multi_token_candidates_by_their_summed_likelihood():
    # Candidates become three tokens (" ", "#", digit) and only the last one tells them apart: the
    # scorer must sum over all of them and read each at the right position (else ties: 0.1).
    class Spaced:  # byte tokenizer that inserts "#" before each answer digit: candidates become 2 tokens
        vocab_size, eod_id = 256, 0

        def encode_docs(self, docs):
            return ByteTokenizer().encode_docs([re.sub(r"^ (\d)$", r" #\1", d) for d in docs])

    def next_char(text):
        if m := re.search(r"(\d) \+ (\d) = #$", text):
            return str(int(m[1]) + int(m[2]))
        return "#" if text.endswith("=") else None

    probe = ArithmeticTransferProbe(n_items=10)
    assert probe(TextLM(next_char), Spaced()) == 1.0


# --- grammar depth ----------------------------------------------------------------------------


def _derive(g: RandomPCFG, rng: random.Random, kind: str, idx: int, depth: int) -> list[tuple[str, int]]:
    # Recursive pre-order derivation: the same draws as the stack-based generator, written independently.
    if kind == "P":
        return [(rng.choices(g.pre[idx], g.pre_w[idx])[0], depth)]
    rhs = rng.choices(g.rules[idx], g.rule_w[idx])[0]
    return [wd for k, i in rhs for wd in _derive(g, rng, k, i, depth + 1)]


@pytest.mark.parametrize("grammar_seed", [1, 2])
def test_tagged_sentence_is_sentence_with_recursively_derived_depths(grammar_seed):
    g = RandomPCFG(grammar_seed)
    r1, r2, r3 = random.Random(3), random.Random(3), random.Random(3)
    for _ in range(200):
        text, depths = g.tagged_sentence(r1)
        assert text == g.sentence(r2)
        words = _derive(g, r3, "N", 0, 0)
        assert text == " ".join(w for w, _ in words).capitalize() + " ."
        assert depths == [d for _, d in words] and min(depths) >= 1
    assert r1.getstate() == r2.getstate() == r3.getstate()


def test_tagged_sentence_on_a_hand_built_grammar():
    g = RandomPCFG.__new__(RandomPCFG)  # N0 -> P0 N1 P1 ; N1 -> P2 N2 ; N2 -> P3 P3
    g.pre, g.pre_w = [["aa"], ["bb"], ["cc"], ["dd"]], [[1.0]] * 4
    g.rules = [[[("P", 0), ("N", 1), ("P", 1)]], [[("P", 2), ("N", 2)]], [[("P", 3), ("P", 3)]]]
    g.rule_w = [[1.0]] * 3
    assert g.tagged_sentence(random.Random(0)) == ("Aa cc dd dd bb .", [1, 2, 3, 3, 1])


def test_grammar_probe_splits_labels_and_chance():
    probe = GrammarDepthProbe(n_train=100, n_test=60)
    train, test = probe.sentences[:100], probe.sentences[100:]
    assert len(test) == 60
    assert not {"".join(c) for c, _ in train} & {"".join(c) for c, _ in test}  # disjoint sentences
    for chunks, labels in probe.sentences:
        assert chunks[0] == "\n" and len(chunks) == len(labels) + 1 and len("".join(chunks)) <= 64
    counts = np.bincount([c for _, labels in test for c in labels], minlength=3)
    assert probe.chance == pytest.approx(counts.max() / counts.sum())
    # Buckets <=2, 3, >=4 are reasonably balanced on the held-out grammar.
    assert all(0.2 < share < 0.5 for share in counts / counts.sum())
    assert [GrammarDepthProbe.depth_class(d) for d in range(1, 7)] == [0, 0, 1, 2, 2, 2]


def test_grammar_probe_oracle_is_perfect_word_identity_is_lexical_baseline_constant_is_chance():
    probe = GrammarDepthProbe(n_train=60, n_test=40)
    tok = ByteTokenizer()
    assert probe(WordFeatures(probe, oracle=True), tok) == 1.0
    assert probe.chance < probe.lexical_baseline < 1.0
    # A linear probe on one-hot words is a regularized per-word class lookup: near the lexical baseline.
    full = GrammarDepthProbe()
    assert full(WordFeatures(full, oracle=False), tok) == pytest.approx(full.lexical_baseline, abs=0.04)

    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = nn.Parameter(torch.zeros(()))

        def features(self, idx):
            return torch.ones(*idx.shape, 8)

    # No information: the fitted probe predicts the training majority class for every word.
    counts = np.bincount([c for _, labels in probe.sentences[60:] for c in labels], minlength=3)
    train_major = np.bincount([c for _, labels in probe.sentences[:60] for c in labels]).argmax()
    assert probe(Constant(), tok) == pytest.approx(counts[train_major] / counts.sum())


# --- real models, both probes -----------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [lambda: GPT(GPTConfig(size="tiny")), lambda: Llama(LlamaConfig(size="tiny"))], ids=["gpt", "llama"]
)
def test_features_then_head_is_forward_bit_for_bit(make):
    torch.manual_seed(0)
    model = make()
    idx = torch.randint(0, 256, (2, 16))
    assert torch.equal(model.lm_head(model.features(idx)), model(idx))


SMALL_PROBES = {
    "arith_transfer": lambda: ArithmeticTransferProbe(n_items=40),
    "grammar_depth": lambda: GrammarDepthProbe(n_train=60, n_test=40),
}


@pytest.mark.parametrize("name", SMALL_PROBES)
def test_probe_on_random_gpt_is_sane_deterministic_and_side_effect_free(name, tiny_gpt):
    probe, tok = SMALL_PROBES[name](), ByteTokenizer()
    tiny_gpt.train()
    tiny_gpt.blocks[0].eval()  # mixed modes must come back exactly
    modes = [m.training for m in tiny_gpt.modules()]
    params = {k: v.clone() for k, v in tiny_gpt.state_dict().items()}
    torch.manual_seed(123)
    random.seed(123)
    torch_state, py_state, threads = torch.get_rng_state(), random.getstate(), torch.get_num_threads()

    first, second = probe(tiny_gpt, tok), probe(tiny_gpt, tok)

    assert first == second == SMALL_PROBES[name]()(tiny_gpt, tok)  # a fresh probe rebuilds the same items
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert torch.get_num_threads() == threads
    assert [m.training for m in tiny_gpt.modules()] == modes
    assert all(torch.equal(v, params[k]) for k, v in tiny_gpt.state_dict().items())
    # Untrained: no arithmetic; depth only from word identity, which random features still carry.
    assert 0.0 <= first <= (0.4 if name == "arith_transfer" else 0.8)


def test_items_depend_on_the_seed():
    assert ArithmeticTransferProbe(seed=1).items != ArithmeticTransferProbe(seed=2).items
    assert GrammarDepthProbe(seed=1).sentences != GrammarDepthProbe(seed=2).sentences


def test_bpe_tokenizer(tmp_path, tiny_gpt):
    docs = list(itertools.islice(arithmetic_docs(0, 10**9), 200))
    docs += [RandomPCFG(2).sentence(random.Random(i)) for i in range(300)]
    tok = BPETokenizer.train(docs, 320, tmp_path / "tok.json")
    text = "3 + 4 = 7\nZuba ke ."
    ids = encode_text(tok, text)
    assert tok.eod_id not in ids and tok.decode(ids) == text
    assert encode_text(ByteTokenizer(), text) == list(text.encode())

    probe = GrammarDepthProbe(n_train=30, n_test=20)
    for chunks, _ in probe.sentences:  # the probe encodes word by word: same ids as the whole text
        assert [t for c in chunks for t in encode_text(tok, c)] == encode_text(tok, "".join(chunks))
    torch.manual_seed(0)
    model = GPT(GPTConfig(size="tiny", vocab_size=tok.vocab_size))
    assert 0.0 <= ArithmeticTransferProbe(n_items=20)(model, tok) <= 1.0
    assert 0.0 <= probe(model, tok) <= 1.0
