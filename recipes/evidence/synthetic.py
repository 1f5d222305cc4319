"""A synthetic multi-source family whose optimal loss is known: hidden Markov models that share part of
their latent state (the setting of Liu et al. 2022, "Same pre-training loss, better downstream").

Every source is an HMM over a joint latent state ``(a, b)``:

* ``a`` (``n_shared`` values) is the **shared** chain: the same transition matrix ``A`` and the same
  emission ``E_u[a] -> u`` in every source;
* ``b`` (``n_private`` values) is the source's **private** chain: its transition ``B_s[a']`` depends on the
  shared state it moves under (so predicting a source's private symbols needs the shared state too) and
  it emits ``v`` through the source's own ``E_s[b]``.

A token is the pair ``(u, v)`` (id ``u * private_symbols + v``). The held-out source keeps ``A`` and
``E_u`` and draws a fresh private part: a model that has learnt to track the shared chain can reuse it
there, which is what the transfer fine-tune and the linear probe of ``a`` measure.

Each training sequence is one stationary run of a source's HMM, prefixed by the source's tag token (the
tag is input only, never a label). Knowing the source from the tag, the best possible model predicts each
token with the HMM's own predictive distribution ``p(x_t | x_<t)`` (forward algorithm), so the optimal
expected loss for a context of ``T`` labels is ``(1/T) Σ_t H(X_t | X_<t)``:

* :func:`optimal_loss` estimates it by Monte Carlo over sampled sequences, Rao-Blackwellised: each
  sequence contributes the *exact* entropies of its forward predictive distributions (not the sampled
  tokens' surprisal), so the only error is the spread over prefixes; the standard error is returned.
* :func:`sequence_loss` is the *exact* Bayes-optimal loss on given sequences: the number a model's
  validation loss on those very sequences is compared with (no sampling error in the gap).

``HMMDataModule`` serves the family like ``lightning_nexus.data.MixedSourceDataModule``: single-source
micro-batches tagged with ``source_id``, one validation loader per source (train sources, then the
held-out one) and the same name properties, so ``CausalLMModule`` and ``EvidenceCallback`` use it unchanged.

Example::

    >>> family = hmm_family(n_sources=2, seed=0)
    >>> [h.n_states for h in family.sources], family.heldout.n_states
    ([6, 6], 6)
    >>> loss, stderr = optimal_loss(family.sources[0], length=16, n_sequences=200, seed=0)
    >>> 0 < loss < math.log(family.sources[0].n_symbols) and stderr < 0.05
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_nexus.data.schedule import SourceSchedule
from lightning_nexus_recipes.evidence.modes import eval_mode
from lightning_nexus_recipes.evidence.probes import fit_logistic

__all__ = [
    "HMM",
    "HMMDataModule",
    "HMMFamily",
    "LatentStateProbe",
    "hmm_family",
    "optimal_loss",
    "sequence_loss",
]

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class HMM:
    """A discrete HMM: ``initial[i]``, ``transition[i, j] = P(j | i)``, ``emission[i, x] = P(x | i)``.

    ``shared_state[i]`` is the shared-chain component ``a`` of joint state ``i`` (the linear probe's label).
    """

    initial: np.ndarray
    transition: np.ndarray
    emission: np.ndarray
    shared_state: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.initial)
        if self.transition.shape != (n, n) or self.emission.shape[0] != n or self.shared_state.shape != (n,):
            raise ValueError(
                f"HMM shapes disagree: initial {self.initial.shape}, transition {self.transition.shape}, "
                f"emission {self.emission.shape}, shared_state {self.shared_state.shape}"
            )
        for name, m in (("initial", self.initial), ("transition", self.transition), ("emission", self.emission)):
            if np.any(m < 0) or not np.allclose(m.sum(-1), 1.0):
                raise ValueError(f"HMM.{name} must hold probability distributions (non-negative, rows sum to 1)")

    @property
    def n_states(self) -> int:
        return len(self.initial)

    @property
    def n_symbols(self) -> int:
        return self.emission.shape[1]

    def sample(self, n: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` independent runs of ``length`` steps: (symbols, states), both ``[n, length]`` int64."""
        states = np.empty((n, length), dtype=np.int64)
        symbols = np.empty((n, length), dtype=np.int64)
        trans_cdf, emit_cdf = np.cumsum(self.transition, 1), np.cumsum(self.emission, 1)
        states[:, 0] = _draw(np.broadcast_to(np.cumsum(self.initial), (n, self.n_states)), rng)
        for t in range(length):
            if t > 0:
                states[:, t] = _draw(trans_cdf[states[:, t - 1]], rng)
            symbols[:, t] = _draw(emit_cdf[states[:, t]], rng)
        return symbols, states

    def filter(self, symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Forward algorithm on ``symbols [n, L]``: the predictive distributions ``p(x_t | x_<t)``
        ``[n, L, n_symbols]`` and the filtered posteriors ``p(state_t | x_≤t)`` ``[n, L, n_states]``."""
        n, length = symbols.shape
        predictive = np.empty((n, length, self.n_symbols))
        posterior = np.empty((n, length, self.n_states))
        prior = np.broadcast_to(self.initial, (n, self.n_states))
        for t in range(length):
            if t > 0:
                prior = posterior[:, t - 1] @ self.transition
            predictive[:, t] = prior @ self.emission
            joint = prior * self.emission[:, symbols[:, t]].T
            posterior[:, t] = joint / joint.sum(1, keepdims=True)
        return predictive, posterior


def _draw(cdf: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw per row of the cumulative distributions ``cdf [n, k]``."""
    u = rng.random((cdf.shape[0], 1))
    return np.minimum((u > cdf).sum(1), cdf.shape[1] - 1)


def optimal_loss(hmm: HMM, length: int, n_sequences: int = 4000, seed: int = 0) -> tuple[float, float]:
    """``(1/length) Σ_t H(X_t | X_<t)`` in nats, estimated over ``n_sequences`` sampled runs, and its
    standard error. Each run contributes the exact entropies of its predictive distributions, so the
    estimate is unbiased and its error is only the variation between prefixes."""
    if n_sequences < 2 or length < 1:
        raise ValueError(f"need n_sequences >= 2 and length >= 1, got {n_sequences}, {length}")
    symbols, _ = hmm.sample(n_sequences, length, np.random.default_rng([seed, 0x0E47]))
    predictive, _ = hmm.filter(symbols)
    entropy = -(predictive * np.log(np.where(predictive > 0, predictive, 1.0))).sum(-1)  # [n, L]
    per_sequence = entropy.mean(1)
    return float(per_sequence.mean()), float(per_sequence.std(ddof=1) / math.sqrt(n_sequences))


def sequence_loss(hmm: HMM, symbols: np.ndarray) -> float:
    """Exact Bayes-optimal mean next-token loss on ``symbols [n, L]``: mean of ``-log p(x_t | x_<t)``."""
    predictive, _ = hmm.filter(symbols)
    picked = np.take_along_axis(predictive, symbols[..., None], -1)[..., 0]
    return float(-np.log(picked).mean())


# ------------------------------------------------------------------------------------------------ family


@dataclass(frozen=True)
class HMMFamily:
    """Training sources and the held-out source; token ids ``u * private_symbols + v``."""

    sources: list[HMM]
    heldout: HMM
    shared_symbols: int
    private_symbols: int
    n_shared: int


def hmm_family(
    n_sources: int = 3,
    n_shared: int = 3,
    n_private: int = 2,
    shared_symbols: int = 3,
    private_symbols: int = 3,
    transition_concentration: float = 0.3,
    emission_concentration: float = 0.3,
    seed: int = 0,
) -> HMMFamily:
    """Draw the family: the shared part once, a private part per source and one more for the held-out source.

    Rows of every matrix are Dirichlet draws; small concentrations give sparse, near-deterministic rows
    (low entropy, short memory), large ones near-uniform rows. Initial distributions are stationary, so a
    sequence looks like a window of one long run.
    """
    if n_sources < 1 or min(n_shared, n_private, shared_symbols, private_symbols) < 1:
        raise ValueError("hmm_family: every size must be >= 1")
    if transition_concentration <= 0 or emission_concentration <= 0:
        raise ValueError("hmm_family: concentrations must be > 0")
    rng = np.random.default_rng([seed, 0x4A4D])
    shared_transition = rng.dirichlet([transition_concentration] * n_shared, size=n_shared)
    shared_emission = rng.dirichlet([emission_concentration] * shared_symbols, size=n_shared)

    def private() -> HMM:
        transition = rng.dirichlet([transition_concentration] * n_private, size=(n_shared, n_private))
        emission = rng.dirichlet([emission_concentration] * private_symbols, size=n_private)
        return _joint(shared_transition, shared_emission, transition, emission)

    sources = [private() for _ in range(n_sources)]
    return HMMFamily(sources, private(), shared_symbols, private_symbols, n_shared)


def _joint(a_trans: np.ndarray, a_emit: np.ndarray, b_trans: np.ndarray, b_emit: np.ndarray) -> HMM:
    """The joint HMM of state ``(a, b)`` (index ``a * n_private + b``):
    ``P(a', b' | a, b) = A[a, a'] · B[a'][b, b']`` and ``P(u, v | a, b) = E_u[a, u] · E_v[b, v]``."""
    na, nb = a_trans.shape[0], b_trans.shape[1]
    transition = np.einsum("ac,cbd->abcd", a_trans, b_trans).reshape(na * nb, na * nb)
    emission = np.einsum("au,bv->abuv", a_emit, b_emit).reshape(na * nb, -1)
    # stationary distribution: the left eigenvector of eigenvalue 1, cleaned of rounding
    values, vectors = np.linalg.eig(transition.T)
    stationary = np.abs(np.real(vectors[:, np.argmin(np.abs(values - 1))]))
    return HMM(stationary / stationary.sum(), transition, emission, np.repeat(np.arange(na), nb))


# -------------------------------------------------------------------------------------------- datamodule


class _TrainBatches(IterableDataset):
    """Micro-batch ``i`` is the ``c``-th use of the source the schedule gives it, drawn from a generator seeded
    by ``(seed, source, c)``: a pure function of the index, like ``MixedSourceDataModule``'s batches."""

    def __init__(self, dm: HMMDataModule, length: int) -> None:
        self.dm, self.length = dm, length
        self.schedule = SourceSchedule([1.0] * len(dm.family.sources), dm.schedule, dm.seed)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Batch]:
        for i in range(self.length):
            yield self.batch(i)

    def batch(self, index: int) -> Batch:
        s = int(self.schedule.sources(index, index + 1)[0])
        use = int(self.schedule.counts_before(index)[s])
        return self.dm.make_batch(s, np.random.default_rng([self.dm.seed, s, use, 0x7A41]))


class _FixedBatches(IterableDataset):
    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        yield from self.batches


class HMMDataModule(LightningDataModule):
    """The HMM family as single-source micro-batches ``{"input_ids", "labels", "source_id"}``.

    Sequences are ``[tag_s, x_1 … x_T]`` (``T = block_size``); ``input_ids`` are the first ``T`` tokens,
    ``labels`` the last ``T``, so the tag is never predicted and every label is predicted knowing the source.
    The family is fixed by ``family_seed``; ``seed`` (set per run by ``lightning-nexus experiment``) only
    changes the training draws and source order. Validation batches depend on ``family_seed`` alone, so every
    run of an experiment is validated on the same sequences and :meth:`optimal_val_loss` is one exact number
    per source. One epoch is ``train_batches_per_epoch`` micro-batches; each epoch draws fresh sequences.

    Args:
        n_sources: training sources (``hmm_0`` …); the held-out source is ``hmm_heldout``.
        n_shared, n_private, shared_symbols, private_symbols, transition_concentration,
            emission_concentration: the family's shape (see :func:`hmm_family`).
        family_seed: draws the HMMs and the validation and transfer sequences.
        block_size: labels per sequence ``T``.
        batch_size: sequences per micro-batch.
        schedule: ``weighted`` (a fresh source order per period) or ``round_robin``.
        seed: training draws and source order.
        val_batches_per_source: validation micro-batches per source.
        train_batches_per_epoch: micro-batches per epoch.

    Example::

        >>> dm = HMMDataModule(n_sources=2, block_size=8, batch_size=2)
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["input_ids"].shape, dm.source_names
        (torch.Size([2, 8]), ['hmm_0', 'hmm_1', 'hmm_heldout'])
    """

    def __init__(
        self,
        n_sources: int = 3,
        n_shared: int = 3,
        n_private: int = 2,
        shared_symbols: int = 3,
        private_symbols: int = 3,
        transition_concentration: float = 0.3,
        emission_concentration: float = 0.3,
        family_seed: int = 0,
        block_size: int = 32,
        batch_size: int = 16,
        schedule: Literal["round_robin", "weighted"] = "weighted",
        seed: int = 0,
        val_batches_per_source: int = 8,
        train_batches_per_epoch: int = 100_000,
    ) -> None:
        super().__init__()
        for arg, val in (("block_size", block_size), ("batch_size", batch_size)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"HMMDataModule.{arg} must be an integer >= 1, got {val!r}")
        if not isinstance(val_batches_per_source, int) or val_batches_per_source < 1:
            raise ValueError(f"HMMDataModule.val_batches_per_source must be >= 1, got {val_batches_per_source!r}")
        if schedule not in ("round_robin", "weighted"):
            raise ValueError(f"HMMDataModule.schedule must be 'round_robin' or 'weighted', got {schedule!r}")
        self.family = hmm_family(
            n_sources,
            n_shared,
            n_private,
            shared_symbols,
            private_symbols,
            transition_concentration,
            emission_concentration,
            family_seed,
        )
        self.family_seed, self.block_size, self.batch_size = family_seed, block_size, batch_size
        self.schedule, self.seed = schedule, seed
        self.val_batches_per_source, self.train_batches_per_epoch = val_batches_per_source, train_batches_per_epoch
        self._val: list[tuple[Batch, np.ndarray]] | None = None
        self._optimal: dict[str, float] | None = None

    # -- names, as MixedSourceDataModule has them
    @property
    def train_source_names(self) -> list[str]:
        return [f"hmm_{i}" for i in range(len(self.family.sources))]

    @property
    def ood_source_names(self) -> list[str]:
        return ["hmm_heldout"]

    @property
    def source_names(self) -> list[str]:
        return self.train_source_names + self.ood_source_names

    @property
    def val_source_names(self) -> list[str]:
        return self.source_names

    @property
    def vocab_size(self) -> int:
        return self.family.shared_symbols * self.family.private_symbols + len(self.source_names)

    def hmm(self, source: int) -> HMM:
        """The HMM of source index ``source`` (into :attr:`source_names`)."""
        return (self.family.sources + [self.family.heldout])[source]

    def sample(self, source: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``n`` tagged sequences of ``source``: tokens ``[n, T + 1]``, the HMM's symbols and states ``[n, T]``."""
        symbols, states = self.hmm(source).sample(n, self.block_size, rng)
        tag = self.family.shared_symbols * self.family.private_symbols + source
        tokens = np.concatenate([np.full((n, 1), tag, dtype=np.int64), symbols], axis=1)
        return tokens, symbols, states

    def make_batch(self, source: int, rng: np.random.Generator) -> Batch:
        tokens, _, _ = self.sample(source, self.batch_size, rng)
        return _to_batch(tokens, source)

    # -- data
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_TrainBatches(self, self.train_batches_per_epoch), batch_size=None)

    def _validation(self) -> list[tuple[Batch, np.ndarray]]:
        if self._val is None:
            self._val = []
            for s in range(len(self.source_names)):
                rng = np.random.default_rng([self.family_seed, s, 0x7A11])
                tokens, symbols, _ = self.sample(s, self.val_batches_per_source * self.batch_size, rng)
                self._val.append((_to_batch(tokens, s), symbols))
        return self._val

    def val_dataloader(self) -> list[DataLoader]:
        loaders = []
        for batch, _ in self._validation():
            parts = [
                {k: v[i : i + self.batch_size] for k, v in batch.items()}
                for i in range(0, len(batch["labels"]), self.batch_size)
            ]
            loaders.append(DataLoader(_FixedBatches(parts), batch_size=None))
        return loaders

    def transfer_batches(self, n_batches: int) -> list[Batch]:
        """Training batches of the held-out source for the transfer fine-tune (disjoint draws from validation)."""
        s = len(self.source_names) - 1
        rng = np.random.default_rng([self.family_seed, s, 0x7F7E])
        return [self.make_batch(s, rng) for _ in range(n_batches)]

    def optimal_val_loss(self) -> dict[str, float]:
        """Exact Bayes-optimal loss on each source's validation sequences (what ``val/loss/<source>`` is compared with)."""
        if self._optimal is None:
            self._optimal = {
                name: sequence_loss(self.hmm(s), symbols)
                for s, (name, (_, symbols)) in enumerate(zip(self.source_names, self._validation()))
            }
        return dict(self._optimal)

    def optimal_losses(self, n_sequences: int = 4000) -> dict[str, tuple[float, float]]:
        """:func:`optimal_loss` (estimate, standard error) of every source for this context length."""
        return {
            name: optimal_loss(self.hmm(s), self.block_size, n_sequences, seed=s)
            for s, name in enumerate(self.source_names)
        }

    def evidence_probes(self) -> list[LatentStateProbe]:
        """Probes ``EvidenceCallback`` runs at every validation in place of its text probes."""
        return [LatentStateProbe(self)]


def _to_batch(tokens: np.ndarray, source: int) -> Batch:
    t = torch.from_numpy(tokens)
    return {
        "input_ids": t[:, :-1].contiguous(),
        "labels": t[:, 1:].contiguous(),
        "source_id": torch.full((len(t),), source, dtype=torch.long),
    }


# ------------------------------------------------------------------------------------------------ probe


class LatentStateProbe:
    """Linear probe on frozen hidden states predicting the held-out source's shared latent state ``a_t``.

    Features at input position ``j >= 1`` (token ``x_j``) are the model's final hidden states; the label is
    the shared state that emitted ``x_j``. A multinomial logistic regression (the same deterministic fit as
    ``GrammarDepthProbe``) is fitted on ``n_train`` sequences and scored on ``n_test``. Reference points:
    ``chance`` (majority class of the test labels) and ``ceiling``, the accuracy of the Bayes filter's own
    guess ``argmax p(a_j | x_≤j)``: no predictor of ``a_j`` from the tokens does better in expectation (on a
    small test set either reference can come out above the other by chance).

    Example::

        >>> from lightning_nexus_recipes.models import GPT, GPTConfig
        >>> dm = HMMDataModule(block_size=8)
        >>> probe = LatentStateProbe(dm, n_train=8, n_test=8)
        >>> model = GPT(GPTConfig(size="tiny", n_layer=1, n_embd=16, n_head=2, block_size=8, vocab_size=dm.vocab_size))
        >>> 0.0 <= probe(model) <= 1.0 and 0.0 < probe.chance <= 1.0 and 0.0 < probe.ceiling <= 1.0
        True
    """

    name = "latent_state"

    def __init__(
        self, dm: HMMDataModule, n_train: int = 64, n_test: int = 64, l2: float = 1e-3, iters: int = 100
    ) -> None:
        s = len(dm.source_names) - 1
        tokens, symbols, states = dm.sample(s, n_train + n_test, np.random.default_rng([dm.family_seed, s, 0x9A0B]))
        hmm = dm.hmm(s)
        _, posterior = hmm.filter(symbols)
        shared_posterior = np.stack(
            [posterior[..., hmm.shared_state == a].sum(-1) for a in range(dm.family.n_shared)], -1
        )
        # input position j holds x_j (j >= 1); its label is the shared state that emitted x_j: states[:, j - 1]
        self.inputs = torch.from_numpy(tokens[:, :-1])
        labels = hmm.shared_state[states[:, :-1]]
        self.labels = torch.from_numpy(labels)
        self.n_train, self.n_classes, self.l2, self.iters = n_train, dm.family.n_shared, l2, iters
        test_labels = labels[n_train:].ravel()
        self.chance: float = float(np.bincount(test_labels, minlength=self.n_classes).max() / len(test_labels))
        self.ceiling: float = float((shared_posterior[n_train:, :-1].argmax(-1).ravel() == test_labels).mean())

    def __call__(self, model: nn.Module, tokenizer: object = None) -> float:
        """Test accuracy in [0, 1]; ``tokenizer`` is ignored (the probe brings its own tokens)."""
        with eval_mode(model), torch.no_grad():
            device = next(model.parameters()).device
            hidden = cast(Any, model).features(self.inputs.to(device))[:, 1:].to("cpu", torch.float64)
        x_train, x_test = hidden[: self.n_train].flatten(0, 1), hidden[self.n_train :].flatten(0, 1)
        y_train, y_test = self.labels[: self.n_train].flatten(), self.labels[self.n_train :].flatten()
        mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
        weight, bias = fit_logistic((x_train - mean) / std, y_train, self.n_classes, self.l2, self.iters)
        pred = (((x_test - mean) / std) @ weight + bias).argmax(1)
        return float((pred == y_test).double().mean())
