"""The synthetic HMM family: optimal losses against brute-force enumeration, the family's shared part, the
data module's determinism and single-source batches, and the latent-state probe's label alignment."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_nexus_recipes.evidence.synthetic import (
    HMM,
    HMMDataModule,
    LatentStateProbe,
    hmm_family,
    optimal_loss,
    sequence_loss,
)

# ---------------------------------------------------------------------------------------------- references


def brute_force_marginals(hmm: HMM, length: int) -> dict[tuple[int, ...], float]:
    """p(x_1..x_t) for every t <= length and every symbol prefix, by summing over all state paths."""
    probs: dict[tuple[int, ...], float] = {}
    n, v = hmm.n_states, hmm.n_symbols
    for t in range(1, length + 1):
        for xs in itertools.product(range(v), repeat=t):
            total = 0.0
            for zs in itertools.product(range(n), repeat=t):
                p = hmm.initial[zs[0]] * hmm.emission[zs[0], xs[0]]
                for k in range(1, t):
                    p *= hmm.transition[zs[k - 1], zs[k]] * hmm.emission[zs[k], xs[k]]
                total += p
            probs[xs] = total
    return probs


def brute_force_optimal_loss(hmm: HMM, length: int) -> float:
    """(1/L) Σ_t H(X_t | X_<t) = (1/L) H(X_1..X_L) (chain rule), from the enumerated joint."""
    marg = brute_force_marginals(hmm, length)
    joint = [p for xs, p in marg.items() if len(xs) == length]
    return -sum(p * math.log(p) for p in joint if p > 0) / length


def random_hmm(seed: int, n_states: int = 3, n_symbols: int = 2) -> HMM:
    rng = np.random.default_rng(seed)
    transition = rng.dirichlet([0.7] * n_states, size=n_states)
    emission = rng.dirichlet([0.7] * n_symbols, size=n_states)
    initial = rng.dirichlet([1.0] * n_states)
    return HMM(initial, transition, emission, np.zeros(n_states, dtype=np.int64))


# ------------------------------------------------------------------------------------------ optimal losses


@pytest.mark.parametrize("seed", [0, 1])
def test_optimal_loss_matches_brute_force_enumeration(seed):
    hmm, length = random_hmm(seed), 5
    exact = brute_force_optimal_loss(hmm, length)
    estimate, stderr = optimal_loss(hmm, length, n_sequences=20_000, seed=seed)
    assert 0 < stderr < 0.01
    assert abs(estimate - exact) < 4 * stderr, (estimate, exact, stderr)


def test_sequence_loss_is_the_exact_predictive_loss():
    hmm, length = random_hmm(2), 4
    marg = brute_force_marginals(hmm, length)
    symbols, _ = hmm.sample(7, length, np.random.default_rng(0))
    expected = []
    for row in symbols.tolist():
        for t in range(length):
            before = marg[tuple(row[:t])] if t else 1.0
            expected.append(-math.log(marg[tuple(row[: t + 1])] / before))
    assert sequence_loss(hmm, symbols) == pytest.approx(sum(expected) / len(expected), abs=1e-12)


def test_sampling_follows_the_model():
    hmm = random_hmm(3)
    symbols, states = hmm.sample(40_000, 2, np.random.default_rng(1))
    first = np.bincount(states[:, 0], minlength=3) / len(states)
    assert np.allclose(first, hmm.initial, atol=0.01)
    pair = np.zeros((3, 3))
    np.add.at(pair, (states[:, 0], states[:, 1]), 1)
    assert np.allclose(pair / pair.sum(1, keepdims=True), hmm.transition, atol=0.02)
    emitted = np.zeros((3, 2))
    np.add.at(emitted, (states[:, 0], symbols[:, 0]), 1)
    assert np.allclose(emitted / emitted.sum(1, keepdims=True), hmm.emission, atol=0.02)


# ---------------------------------------------------------------------------------------------- the family


def test_family_shares_the_shared_chain_and_emission_and_differs_in_the_rest():
    fam = hmm_family(n_sources=3, n_shared=3, n_private=2, shared_symbols=4, private_symbols=3, seed=0)
    na, nb, su, sv = 3, 2, 4, 3

    def shared_parts(h: HMM) -> tuple[np.ndarray, np.ndarray]:
        t = h.transition.reshape(na, nb, na, nb)
        e = h.emission.reshape(na, nb, su, sv)
        a_trans = t.sum(3)  # [a, b, a']: must not depend on b (the shared chain ignores the private state)
        u_emit = e.sum(3)  # [a, b, u]: must not depend on b
        assert np.allclose(a_trans, a_trans[:, :1]) and np.allclose(u_emit, u_emit[:, :1])
        return a_trans[:, 0], u_emit[:, 0]

    reference = shared_parts(fam.sources[0])
    for h in fam.sources[1:] + [fam.heldout]:
        for got, want in zip(shared_parts(h), reference):
            assert np.allclose(got, want)
        assert not np.allclose(h.emission, fam.sources[0].emission)  # the private emission differs
    for h in fam.sources + [fam.heldout]:
        assert np.allclose(h.initial @ h.transition, h.initial)  # stationary start
        assert h.shared_state.tolist() == [a for a in range(na) for _ in range(nb)]


# ------------------------------------------------------------------------------------------- data module


def train_batches(dm: HMMDataModule, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(iter(dm.train_dataloader()), n))


def test_datamodule_is_deterministic_by_seed_and_validates_on_fixed_sequences():
    a, b, c = (HMMDataModule(block_size=8, batch_size=4, seed=s) for s in (0, 0, 1))
    for x, y in zip(train_batches(a, 12), train_batches(b, 12)):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert any(
        not torch.equal(x["input_ids"], z["input_ids"]) for x, z in zip(train_batches(a, 12), train_batches(c, 12))
    )
    for la, lc in zip(a.val_dataloader(), c.val_dataloader()):  # the run seed does not move validation
        assert all(torch.equal(x["input_ids"], z["input_ids"]) for x, z in zip(la, lc))
    assert a.optimal_val_loss() == c.optimal_val_loss()


def test_train_batches_hold_one_source_with_its_tag_and_labels_shifted():
    dm = HMMDataModule(block_size=8, batch_size=4, seed=3)
    n_content = dm.family.shared_symbols * dm.family.private_symbols
    seen = []
    for batch in train_batches(dm, 30):
        sid = batch["source_id"]
        assert torch.all(sid == sid[0]), sid
        s = int(sid[0])
        seen.append(s)
        assert s < len(dm.train_source_names)
        assert torch.all(batch["input_ids"][:, 0] == n_content + s)  # the tag names the source
        assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
        assert int(batch["labels"].max()) < n_content  # the tag is never a label
    for p in range(0, 30, 3):  # weighted schedule with equal weights: every period holds each source once
        assert sorted(seen[p : p + 3]) == [0, 1, 2]


def test_validation_loaders_cover_train_sources_then_the_heldout_one():
    dm = HMMDataModule(block_size=8, batch_size=4, val_batches_per_source=3)
    loaders = dm.val_dataloader()
    assert dm.val_source_names == ["hmm_0", "hmm_1", "hmm_2", "hmm_heldout"] and len(loaders) == 4
    for s, loader in enumerate(loaders):
        batches = list(loader)
        assert len(batches) == 3 and all(torch.all(b["source_id"] == s) for b in batches)
    transfer = dm.transfer_batches(2)
    assert all(torch.all(b["source_id"] == 3) for b in transfer)
    val_rows = {tuple(r) for b in loaders[3] for r in b["input_ids"].tolist()}
    assert not any(tuple(r) in val_rows for b in transfer for r in b["input_ids"].tolist())


# ----------------------------------------------------------------------------------------------- the probe


class StateOracle(nn.Module):
    """Features = one-hot of the true shared state of the token at each position, looked up by the probe's
    own rows (shifted by ``shift`` positions): a linear probe with the right alignment must score 1."""

    def __init__(self, probe: LatentStateProbe, shift: int) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.rows = {tuple(r): i for i, r in enumerate(probe.inputs.tolist())}
        labels = probe.labels  # [n, T-1]: positions 1..T-1
        states = torch.cat([labels[:, :1], labels], 1)  # position 0 (the tag): any value
        self.states = torch.roll(states, shift, dims=1)
        self.n = probe.n_classes

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        rows = torch.tensor([self.rows[tuple(r)] for r in idx.tolist()])
        return nn.functional.one_hot(self.states[rows], self.n).double() + 0 * self.dummy


def test_latent_probe_reads_the_state_of_each_position():
    dm = HMMDataModule(block_size=12, shared_symbols=4)
    probe = LatentStateProbe(dm, n_train=32, n_test=32)
    assert probe.chance <= probe.ceiling <= 1
    assert probe(StateOracle(probe, shift=0)) == 1.0
    assert probe(StateOracle(probe, shift=1)) < 0.99  # one position off is not the state
