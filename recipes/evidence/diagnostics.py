"""Common-minima diagnostics: how flat the loss is, and how far each data source pulls the model.

Nexus (docs/update_rule.md) aims at the same loss as AdamW but at a point that is a minimum of *every*
source at once. Two cheap probes make that claim measurable on a trained checkpoint:

* **Curvature** (:func:`hutchinson_trace`, :func:`per_source_traces`): the trace of the Hessian of
  each source's loss. A common minimum sits in a region that is flat for all sources, so smaller and
  more uniform per-source traces are the expected signature. Caveats: the trace is a sum over
  parameters (compare models of one shape only), it is not reparametrisation-invariant (a rescaled
  network has another trace at the same function), and it mixes positive and negative curvature.
  The trace is linear in the loss, so the mixture's trace ("all") is exactly the mean of the
  per-source traces: the information is in how the sources *differ*.
* **Fine-tune displacement** (:func:`fine_tune_distances`): fine-tune a copy on one source alone and
  measure how far it moves. At a common minimum every source is already (nearly) minimised, so the
  copies stay close to the start and to each other; at a compromise point each source pulls in its
  own direction. ``spread_ratio = mean pairwise / mean distance to start`` reads like an angle:
  for two moves of equal length it is √(2 − 2·cos), so 0 when all sources move the same way, √2
  when their moves are orthogonal, 2 when opposite. For small ``lr·steps`` the moves are
  −lr·Σ∇L_s, so this is the fine-tune counterpart of the logged ``nexus/grad_cosine``.
  Caveats: the numbers depend on ``lr`` and ``steps`` (compare runs with equal settings only), and
  the losses are measured on the batches used for fine-tuning (training loss, not held-out).

Everything here is pure torch (no Lightning) and leaves the input model as it found it: parameter
values, ``.grad``, train/eval mode, ``requires_grad`` flags and the global RNG state. Models must be
unsharded (not FSDP/DTensor); parameters may sit on CPU or CUDA.

Example::

    >>> from lightning_nexus_recipes.models import GPT, GPTConfig
    >>> model = GPT(GPTConfig(size="tiny", n_layer=1, n_embd=32, n_head=2, block_size=16))
    >>> g = torch.Generator().manual_seed(0)
    >>> def batch():
    ...     t = torch.randint(0, 256, (2, 17), generator=g)
    ...     return {"input_ids": t[:, :-1], "labels": t[:, 1:]}
    >>> batches = {"a": [batch()], "b": [batch()]}
    >>> sorted(per_source_traces(model, batches, n_samples=2))
    ['a', 'all', 'b']
    >>> dist = fine_tune_distances(model, batches, steps=2, lr=0.1)
    >>> dist.pairwise[("a", "b")] == dist.pairwise[("b", "a")]
    True
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_nexus_recipes.evidence.modes import eval_mode

__all__ = [
    "FineTuneDistances",
    "GradientAlignment",
    "TraceEstimate",
    "fine_tune_curve",
    "fine_tune_distances",
    "gradient_alignment",
    "hutchinson_trace",
    "lm_loss",
    "per_source_traces",
]

Batch = dict[str, Tensor]


def lm_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Mean next-token cross-entropy over the tokens whose label is not -100.

    ``batch`` is what ``lightning_nexus.data`` yields: ``input_ids`` and ``labels`` ``[B, T]``, labels
    already shifted by one. Logits are upcast to at least fp32 as in ``recipes.module``, so bf16 models
    give the loss the training run logs (and fp64 models keep fp64).
    """
    device = _device(model)
    logits = model(batch["input_ids"].to(device))
    logits = _upcast(logits)
    labels = batch["labels"].to(device)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


@dataclass(frozen=True)
class TraceEstimate:
    """A Hutchinson estimate of tr(H): the mean of ``n_samples`` values vᵀHv and its standard error."""

    mean: float
    stderr: float
    n_samples: int

    @classmethod
    def from_samples(cls, samples: Tensor) -> TraceEstimate:
        n = samples.numel()
        return cls(mean=float(samples.mean()), stderr=float(samples.std()) / math.sqrt(n), n_samples=n)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "stderr": self.stderr, "n_samples": self.n_samples}


@dataclass(frozen=True)
class FineTuneDistances:
    """Where per-source fine-tuning takes the model (see the module docstring for how to read it).

    ``pairwise`` holds both orders of every pair, so ``pairwise[(a, b)] == pairwise[(b, a)]``;
    ``mean_pairwise`` averages over unordered pairs. ``cross_loss[a][b]`` is the loss on source ``b``
    of the copy fine-tuned on ``a`` (``None`` when not computed); ``cross_loss[a][b] - loss_before[b]``
    is the interference of ``a`` on ``b`` (positive: fine-tuning on ``a`` hurts ``b``).
    """

    steps: int
    lr: float
    to_start: dict[str, float]
    pairwise: dict[tuple[str, str], float]
    mean_to_start: float
    mean_pairwise: float
    loss_before: dict[str, float]
    loss_after: dict[str, float]
    cross_loss: dict[str, dict[str, float]] | None

    @property
    def loss_drop(self) -> dict[str, float]:
        """Loss before minus after fine-tuning, per source: positive means the fine-tune did something."""
        return {s: self.loss_before[s] - self.loss_after[s] for s in self.loss_before}

    @property
    def spread_ratio(self) -> float:
        """``mean_pairwise / mean_to_start``: 0 = all sources move alike, ≈√2 = orthogonal, 2 = opposite."""
        return self.mean_pairwise / self.mean_to_start if self.mean_to_start > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: pairs keyed ``"a__b"`` (each unordered pair once, in source order)."""
        names = list(self.to_start)
        pairs = {f"{a}__{b}": self.pairwise[(a, b)] for i, a in enumerate(names) for b in names[i + 1 :]}
        ratio = self.spread_ratio
        return {
            "optimizer": "sgd",
            "steps": self.steps,
            "lr": self.lr,
            "to_start": dict(self.to_start),
            "pairwise": pairs,
            "mean_to_start": self.mean_to_start,
            "mean_pairwise": self.mean_pairwise,
            "spread_ratio": None if math.isnan(ratio) else ratio,
            "loss_before": dict(self.loss_before),
            "loss_after": dict(self.loss_after),
            "loss_drop": self.loss_drop,
            "cross_loss": None if self.cross_loss is None else {a: dict(r) for a, r in self.cross_loss.items()},
        }


def hutchinson_trace(
    model: nn.Module, loss_fn: Callable[[nn.Module], Tensor], n_samples: int = 8, seed: int = 0
) -> TraceEstimate:
    """Hutchinson estimate of tr(H), H the Hessian of ``loss_fn(model)`` w.r.t. the trainable parameters.

    E[vᵀHv] = tr(H) for Rademacher v (entries ±1); the variance is 2·Σ_{i≠j} H_ij², so the estimate is
    exact for a diagonal H and noisy when off-diagonal curvature dominates (read ``stderr``). Costs one
    forward + backward with ``create_graph`` and then one Hessian-vector product per sample (measured:
    ≈ 3× a forward + backward on the tiny GPT on CPU). The model runs in eval mode (deterministic
    loss, no dropout); see :func:`_vhv_samples` for how attention is made twice differentiable.
    """
    _check_samples(n_samples)
    with _inspection(model):
        return TraceEstimate.from_samples(_vhv_samples(model, [loss_fn], n_samples, seed))


def per_source_traces(
    model: nn.Module,
    batches: Mapping[str, Sequence[Batch]],
    n_samples: int = 4,
    seed: int = 0,
    loss_fn: Callable[[nn.Module, Batch], Tensor] = lm_loss,
) -> dict[str, TraceEstimate]:
    """Hutchinson tr(H) of each source's loss (mean over its batches), plus ``"all"``: the mixture that
    weights every source equally (as Nexus windows with one source per micro-batch do).

    Every source is probed with the same vectors v (same seed), so differences between sources are not
    blurred by independent sampling noise, and ``"all"`` costs nothing: with shared v, the mixture's
    vᵀHv is exactly the mean of the sources' vᵀHv.
    """
    _check_samples(n_samples)
    _check_batches(batches)
    if "all" in batches:
        raise ValueError('a source is named "all", which per_source_traces uses for the mixture; rename it')
    with _inspection(model):
        device = _device(model)
        samples = {
            name: _vhv_samples(model, [_bind(loss_fn, b) for b in _to_device(bs, device)], n_samples, seed)
            for name, bs in batches.items()
        }
    out = {name: TraceEstimate.from_samples(s) for name, s in samples.items()}
    out["all"] = TraceEstimate.from_samples(torch.stack(list(samples.values())).mean(dim=0))
    return out


def fine_tune_distances(
    model: nn.Module,
    batches: Mapping[str, Sequence[Batch]],
    steps: int,
    lr: float,
    loss_fn: Callable[[nn.Module, Batch], Tensor] = lm_loss,
    cross_source: bool = True,
) -> FineTuneDistances:
    """Fine-tune a copy of ``model`` on each source alone and measure the displacements.

    Each source gets ``steps`` steps of plain SGD (no momentum, no weight decay) with learning rate
    ``lr``, cycling through its batches in order, from the same start θ₀. Plain SGD because its
    displacement ``θ_s − θ₀ ≈ −lr·Σ ∇L_s`` is a property of the landscape: long where the source's
    gradient stays large, short where θ₀ already minimises the source. Adam would normalise every
    coordinate to a step of about ``lr`` whatever the gradient, so its distances measure the optimiser
    (≈ lr·steps·√n_params) more than the landscape. SGD is also stateless and exactly reproducible.

    The copies run in eval mode (no dropout: deterministic, and the global RNG is not consumed).
    ``cross_source=False`` skips the cross-source losses (saves S·(S−1) evaluations per batch).
    Raises ``FloatingPointError`` naming the source when a fine-tune diverges (lower ``lr``).
    """
    _check_batches(batches)
    if len(batches) < 2:
        raise ValueError(f"fine_tune_distances compares sources and needs at least 2, got {list(batches)}")
    if steps < 1 or not lr > 0:
        raise ValueError(f"need steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    names = list(batches)
    with _inspection(model):
        device = _device(model)
        data = {name: _to_device(bs, device) for name, bs in batches.items()}
        start = _trainable(model)
        work = copy.deepcopy(model)  # already in eval mode (_inspection)
        # deepcopy keeps parameter order (and weight tying), so the i-th parameters correspond.
        work_params = [w for w, p in zip(work.parameters(), model.parameters(), strict=True) if p.requires_grad]
        for w in work.parameters():
            w.grad = None  # the copy never needs the original's gradients: free that memory

        loss_before = {name: _mean_loss(model, loss_fn, data[name]) for name in names}
        deltas: dict[str, list[Tensor]] = {}
        cross: dict[str, dict[str, float]] = {}
        for name in names:
            with torch.no_grad():
                for w, p in zip(work_params, start):
                    w.copy_(p)
            for step in range(steps):
                batch = data[name][step % len(data[name])]
                loss = loss_fn(work, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"fine-tuning on source {name!r} diverged at step {step} (loss={loss.item()}); lower lr={lr}"
                    )
                grads = torch.autograd.grad(loss, work_params, allow_unused=True)
                with torch.no_grad():
                    for w, g in zip(work_params, grads):
                        if g is not None:  # a parameter outside this loss's graph has zero gradient
                            w.sub_(g, alpha=lr)
            # At least fp32: a bf16 difference of two nearby values would round to a few distinct levels.
            deltas[name] = [_upcast(w.detach()) - _upcast(p.detach()) for w, p in zip(work_params, start)]
            targets = names if cross_source else [name]
            cross[name] = {t: _mean_loss(work, loss_fn, data[t]) for t in targets}
        del work

    to_start = {name: _norm(d) for name, d in deltas.items()}
    pairwise: dict[tuple[str, str], float] = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pairwise[(a, b)] = pairwise[(b, a)] = _norm([x - y for x, y in zip(deltas[a], deltas[b])])
    unordered = [pairwise[(a, b)] for i, a in enumerate(names) for b in names[i + 1 :]]
    return FineTuneDistances(
        steps=steps,
        lr=lr,
        to_start=to_start,
        pairwise=pairwise,
        mean_to_start=sum(to_start.values()) / len(to_start),
        mean_pairwise=sum(unordered) / len(unordered),
        loss_before=loss_before,
        loss_after={name: cross[name][name] for name in names},
        cross_loss=cross if cross_source else None,
    )


@dataclass(frozen=True)
class GradientAlignment:
    """Cosines between per-batch gradients taken at the same weights (see :func:`gradient_alignment`).

    ``cross``: mean over pairs of batches from *different* sources; ``within``: mean over pairs of distinct
    batches of the *same* source, the noise floor (what ``cross`` would be if the sources were one
    distribution); ``cross_of_means``: mean over source pairs of the cosine of their mean gradients.
    ``pairs[(a, b)]`` (both orders) and ``within_by_source[s]`` break the means down.
    """

    cross: float
    within: float
    cross_of_means: float
    pairs: dict[tuple[str, str], float]
    within_by_source: dict[str, float]
    n_batches: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        names = list(self.within_by_source)
        return {
            "cross": self.cross,
            "within": self.within,
            "cross_of_means": self.cross_of_means,
            "pairs": {f"{a}__{b}": self.pairs[(a, b)] for i, a in enumerate(names) for b in names[i + 1 :]},
            "within_by_source": dict(self.within_by_source),
            "n_batches": dict(self.n_batches),
        }


def gradient_alignment(
    model: nn.Module,
    batches: Mapping[str, Sequence[Batch]],
    loss_fn: Callable[[nn.Module, Batch], Tensor] = lm_loss,
) -> GradientAlignment:
    """Cross-source and within-source cosines of the gradients of fixed batches, all at the model's weights.

    Unlike a training-time monitor (which, under Nexus, sees each micro-batch's gradient at a different
    inner point and, under any optimizer, different random batches), this compares every model on the same
    batches at one point, so two optimizers' values are like for like. Each batch's gradient is that of its
    mean loss; cosines use the global vector over all trainable parameters (fp64). Needs >= 2 sources with
    >= 2 batches each (the within-source floor needs two).
    """
    _check_batches(batches)
    if len(batches) < 2 or any(len(bs) < 2 for bs in batches.values()):
        raise ValueError(
            "gradient_alignment needs >= 2 sources with >= 2 batches each (the within-source cosine is the "
            f"noise floor), got { ({k: len(v) for k, v in batches.items()}) }"
        )
    names = list(batches)
    with _inspection(model):
        device = _device(model)
        params = _trainable(model)
        owners: list[str] = []
        vectors: list[Tensor] = []
        for name in names:
            for batch in _to_device(batches[name], device):
                grads = torch.autograd.grad(loss_fn(model, batch), params, allow_unused=True)
                flat = [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64)
                    for g, p in zip(grads, params)
                ]
                vectors.append(torch.cat(flat).cpu())
                owners.append(name)
    g = torch.stack(vectors)
    gram = g @ g.T
    norms = gram.diagonal().sqrt().clamp_min(1e-300)
    cos = gram / norms[:, None] / norms[None, :]
    index = {name: [i for i, o in enumerate(owners) if o == name] for name in names}

    def block_mean(a: str, b: str) -> float:
        values = [float(cos[i, j]) for i in index[a] for j in index[b] if i != j]
        return sum(values) / len(values)

    pairs: dict[tuple[str, str], float] = {}
    means = {name: g[index[name]].mean(0) for name in names}
    of_means = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pairs[(a, b)] = pairs[(b, a)] = block_mean(a, b)
            ma, mb = means[a], means[b]
            of_means.append(float(ma @ mb / (ma.norm() * mb.norm()).clamp_min(1e-300)))
    unordered = [pairs[(a, b)] for i, a in enumerate(names) for b in names[i + 1 :]]
    within = {name: block_mean(name, name) for name in names}
    return GradientAlignment(
        cross=sum(unordered) / len(unordered),
        within=sum(within.values()) / len(within),
        cross_of_means=sum(of_means) / len(of_means),
        pairs=pairs,
        within_by_source=within,
        n_batches={name: len(index[name]) for name in names},
    )


def fine_tune_curve(
    model: nn.Module,
    train_batches: Sequence[Batch],
    eval_batches: Sequence[Batch],
    steps: int,
    lr: float,
    points: int = 4,
    loss_fn: Callable[[nn.Module, Batch], Tensor] = lm_loss,
) -> dict[int, float]:
    """Loss on ``eval_batches`` while a copy of ``model`` is fine-tuned with Adam (``lr``, no weight decay)
    on ``train_batches`` (cycled) for ``steps`` steps: ``{step: loss}`` at step 0 and ``points`` evenly spaced
    steps up to ``steps``. The transfer measure: how fast a model adapts to a source it never trained on.
    The model is left as it was (the copy runs in eval mode; the global RNG is not consumed)."""
    if steps < 1 or points < 1 or not lr > 0 or not train_batches or not eval_batches:
        raise ValueError(
            f"fine_tune_curve needs steps >= 1, points >= 1, lr > 0 and batches, got steps={steps}, "
            f"points={points}, lr={lr}, {len(train_batches)} train / {len(eval_batches)} eval batches"
        )
    marks = sorted({round(steps * (k + 1) / points) for k in range(points)})
    with _inspection(model):
        device = _device(model)
        train, held = _to_device(train_batches, device), _to_device(eval_batches, device)
        work = copy.deepcopy(model)
        params = [w for w, p in zip(work.parameters(), model.parameters(), strict=True) if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=lr)
        curve = {0: _mean_loss(work, loss_fn, held)}
        for step in range(1, steps + 1):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(work, train[(step - 1) % len(train)])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the transfer fine-tune diverged at step {step}; lower lr={lr}")
            loss.backward()
            optimizer.step()
            if step in marks:
                curve[step] = _mean_loss(work, loss_fn, held)
        del work
    return curve


# --------------------------------------------------------------------------------------------------
# internals


@contextlib.contextmanager
def _inspection(model: nn.Module) -> Iterator[None]:
    """Run a diagnostic on ``model`` and put everything back afterwards.

    * eval mode for a deterministic loss (no dropout; recipe models also skip activation
      checkpointing outside training); every module's own ``training`` flag is restored after;
    * the global CPU and CUDA RNG states are forked, so nothing here (or in a user ``loss_fn``) moves
      the training run's random stream; our own sampling uses private ``torch.Generator``\\ s;
    * grad mode on, inference mode off: callers may sit inside Lightning's validation (inference mode);
    * ``torch.compile`` directives ignored ("force_eager"): compiled graphs do not support double
      backward, and eval mode would trigger recompiles (tens of seconds on CPU).
    """
    cuda = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    with (
        eval_mode(model),
        torch.random.fork_rng(devices=cuda),
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.compiler.set_stance("force_eager"),
    ):
        yield


def _vhv_samples(
    model: nn.Module, loss_fns: Sequence[Callable[[nn.Module], Tensor]], n_samples: int, seed: int
) -> Tensor:
    """vᵢᵀHvᵢ for i < n_samples, H the Hessian of ``mean(f(model) for f in loss_fns)``.

    The mean's Hessian is the mean of the Hessians, so each loss is differentiated on its own (one
    graph in memory at a time) and the vectors are regenerated from ``seed`` for each: the same vᵢ
    everywhere, which is what makes the accumulation exact.

    SDPA is forced to its math backend while the graph is recorded: the fused CPU/CUDA kernels
    (flash, memory-efficient) have no double backward ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"); math is plain
    matmul + softmax, twice differentiable, and materialises the T×T attention matrix (fine at
    diagnostic sizes, costly at long contexts). Only here: fine-tuning keeps the fast kernels.
    """
    params = _trainable(model)
    out = torch.zeros(n_samples, dtype=torch.float64)
    for fn in loss_fns:
        with sdpa_kernel(SDPBackend.MATH):
            loss = fn(model) / len(loss_fns)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        # A gradient without grad_fn does not depend on the parameters (loss linear in them, or absent):
        # its Hessian block is zero, and autograd cannot differentiate it again.
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        generators: dict[torch.device, torch.Generator] = {}
        for k in range(n_samples):
            # Generate v for every parameter, used or not, so that v is the same for every loss_fn.
            v = [_rademacher(p, generators, seed) for p in params]
            if not live:
                continue
            # Σ_i J(g_i)ᵀ v_i = H v (H symmetric); the retained graph serves every sample.
            hv = torch.autograd.grad(
                [grads[i] for i in live],
                params,
                grad_outputs=[v[i] for i in live],
                retain_graph=True,
                allow_unused=True,
            )
            out[k] += sum(float(torch.sum(vi * h, dtype=torch.float64)) for vi, h in zip(v, hv) if h is not None)
    return out


def _rademacher(p: Tensor, generators: dict[torch.device, torch.Generator], seed: int) -> Tensor:
    # One private generator per device: samples are made where the parameter lives (no host copies).
    if p.device not in generators:
        generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
    v = torch.randint(0, 2, p.shape, generator=generators[p.device], device=p.device, dtype=p.dtype)
    return v.mul_(2).sub_(1)


def _mean_loss(model: nn.Module, loss_fn: Callable[[nn.Module, Batch], Tensor], batches: Sequence[Batch]) -> float:
    with torch.no_grad():
        return sum(float(loss_fn(model, b)) for b in batches) / len(batches)


def _norm(tensors: Sequence[Tensor]) -> float:
    """Global L2 norm of a list of tensors, accumulated in fp64 (one host sync)."""
    if not tensors:
        return 0.0
    return float(torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors]).norm())


def _upcast(t: Tensor) -> Tensor:
    """``t`` in at least fp32 (fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to_device(batches: Sequence[Batch], device: torch.device) -> list[Batch]:
    # copy=True: fresh, ordinary tensors even if the batches were made under inference mode
    # (inference tensors cannot be saved for backward). Moved once, not once per loss evaluation.
    return [{k: v.to(device, copy=True) if isinstance(v, Tensor) else v for k, v in b.items()} for b in batches]


def _bind(loss_fn: Callable[[nn.Module, Batch], Tensor], batch: Batch) -> Callable[[nn.Module], Tensor]:
    return lambda m: loss_fn(m, batch)


def _check_samples(n_samples: int) -> None:
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2 for a standard error, got {n_samples}")


def _check_batches(batches: Mapping[str, Sequence[Batch]]) -> None:
    if not batches:
        raise ValueError("no sources given")
    empty = [name for name, bs in batches.items() if len(bs) == 0]
    if empty:
        raise ValueError(f"sources without batches: {empty}")
