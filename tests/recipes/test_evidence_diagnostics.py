"""Common-minima diagnostics against independent slow references.

Traces are checked against the exact trace of the full Hessian (``torch.autograd.functional.hessian``
on a flat parameter vector) with a tolerance from the *exact* Hutchinson variance 2·Σ_{i≠j} H_ij²;
fine-tune distances against closed forms and hand-written SGD loops. No expected value is computed
with the code under test.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_nexus_recipes.evidence.diagnostics import (
    FineTuneDistances,
    TraceEstimate,
    fine_tune_curve,
    fine_tune_distances,
    gradient_alignment,
    hutchinson_trace,
    lm_loss,
    per_source_traces,
)
from lightning_nexus_recipes.models import GPT, GPTConfig

DT = torch.float64


# ---------------------------------------------------------------------------------------------- helpers


def reference_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over labels != -100, written out with log_softmax + gather."""
    logp = logits.double().log_softmax(-1)
    mask = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (nll * mask).sum() / mask.sum()


def exact_hessian(model: nn.Module, loss_of_forward) -> torch.Tensor:
    """Full Hessian of ``loss_of_forward(forward)`` w.r.t. the flattened trainable parameters, where
    ``forward(*args)`` calls ``model`` with those parameters (weight tying handled by functional_call)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def f(flat: torch.Tensor) -> torch.Tensor:
        chunks = flat.split([p.numel() for _, p in named])
        params = {n: c.view_as(p) for (n, p), c in zip(named, chunks)}
        return loss_of_forward(lambda *args: functional_call(model, params, args))

    with sdpa_kernel(SDPBackend.MATH):  # the fused SDPA kernels have no double backward
        return torch.autograd.functional.hessian(f, flat0, vectorize=True)


def hutchinson_std(H: torch.Tensor) -> float:
    """Exact standard deviation of vᵀHv for Rademacher v: Var = 2·Σ_{i≠j} H_ij²."""
    off = H - torch.diag(torch.diagonal(H))
    return math.sqrt(2 * float((off**2).sum()))


def small_gpt(seed: int = 0, dropout: float = 0.0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(size="tiny", n_layer=1, n_head=2, n_embd=4, block_size=6, vocab_size=7, dropout=dropout)
    return GPT(cfg).to(DT)


def lm_batches(seed: int, n: int, vocab: int = 7, B: int = 2, T: int = 6) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(0, vocab, (B, T + 1), generator=g)
        labels = t[:, 1:].clone()
        labels[0, 0] = -100  # ignored positions must be skipped by the loss
        out.append({"input_ids": t[:, :-1], "labels": labels, "source_id": torch.zeros(B, dtype=torch.long)})
    return out


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Quadratic(nn.Module):
    """loss_s(θ) = ½ Σ a_i (θ_i + offset_i − target_s,i)²: minimiser θ* = target − offset. ``offset`` is a
    frozen parameter, so it must neither move nor count in distances or traces."""

    def __init__(self, n: int = 6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.theta = nn.Parameter(torch.randn(n, generator=g, dtype=DT))
        self.offset = nn.Parameter(torch.randn(n, generator=g, dtype=DT), requires_grad=False)
        self.register_buffer("a", torch.linspace(0.5, 2.0, n, dtype=DT))


def quad_loss(model: Quadratic, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    d = model.theta + model.offset - batch["target"]
    return 0.5 * (model.a * d**2).sum()


def quad_value(a: torch.Tensor, theta: torch.Tensor, offset: torch.Tensor, target: torch.Tensor) -> float:
    return float(0.5 * (a * (theta + offset - target) ** 2).sum())


def targets(seed: int, n_sources: int, n_batches: int, n: int = 6) -> dict[str, list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"s{i}": [{"target": torch.randn(n, generator=g, dtype=DT)} for _ in range(n_batches)] for i in range(n_sources)
    }


# ------------------------------------------------------------------------------------------------ lm_loss


def test_lm_loss_matches_written_out_cross_entropy_with_ignored_labels():
    model = small_gpt()
    batch = lm_batches(0, 1)[0]
    batch["labels"][1, 2:] = -100
    expected = reference_lm_loss(model(batch["input_ids"]), batch["labels"])
    assert lm_loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-10)


# ------------------------------------------------------------------------------------------------- traces


class DiagonalQuadratic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -1.0, 2.0], dtype=DT))
        self.u = nn.Parameter(torch.tensor([[1.0, 2.0], [0.5, -0.7]], dtype=DT))
        self.frozen = nn.Parameter(torch.ones(2, dtype=DT), requires_grad=False)


def test_hutchinson_is_exact_for_a_diagonal_hessian_and_ignores_frozen_params():
    # H = diag(c) over the trainable params: every Rademacher sample gives vᵀHv = Σ c exactly.
    c_w, c_u = torch.tensor([1.0, -2.0, 5.0], dtype=DT), torch.tensor([[0.5, 3.0], [4.0, 0.25]], dtype=DT)
    model = DiagonalQuadratic()

    def loss_fn(m: DiagonalQuadratic) -> torch.Tensor:
        # Linear terms and the frozen parameter's curvature must not enter the trace.
        quad = 0.5 * (c_w * m.w**2).sum() + 0.5 * (c_u * m.u**2).sum() + 3.0 * m.w.sum()
        return quad + 100.0 * (m.frozen**2).sum()

    est = hutchinson_trace(model, loss_fn, n_samples=5, seed=11)
    assert est.mean == pytest.approx(float(c_w.sum() + c_u.sum()), abs=1e-12)
    assert est.stderr == pytest.approx(0.0, abs=1e-12)
    assert est.n_samples == 5


def test_hutchinson_matches_full_hessian_trace_of_an_mlp():
    model = MLP()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, generator=g, dtype=DT), torch.randn(16, 2, generator=g, dtype=DT)
    H = exact_hessian(model, lambda fwd: ((fwd(x) - y) ** 2).mean())
    exact, std = float(torch.trace(H)), hutchinson_std(H)
    n = 400
    assert std / math.sqrt(n) < 0.1 * abs(exact)  # the comparison below is informative

    est = hutchinson_trace(model, lambda m: ((m(x) - y) ** 2).mean(), n_samples=n, seed=1)
    assert abs(est.mean - exact) < 4 * std / math.sqrt(n)
    # the reported standard error estimates the exact one
    assert est.stderr == pytest.approx(std / math.sqrt(n), rel=0.25)


def attention_only_gpt() -> GPT:
    """Small GPT with only the attention projections trainable (80 parameters): their second
    derivatives run through SDPA's double backward, and at this seed the exact Hutchinson standard
    deviation is about |tr H|, so a few dozen samples make a meaningful comparison."""
    model = small_gpt(seed=0)
    for n, p in model.named_parameters():
        p.requires_grad_(".attn." in n)
    return model


def test_hutchinson_matches_full_hessian_trace_of_a_small_gpt_through_sdpa():
    model = attention_only_gpt()
    batch = lm_batches(0, 1)[0]
    H = exact_hessian(model, lambda fwd: reference_lm_loss(fwd(batch["input_ids"]), batch["labels"]))
    assert H.shape == (80, 80)
    exact, std = float(torch.trace(H)), hutchinson_std(H)
    n = 48
    assert std / math.sqrt(n) < 0.2 * abs(exact)  # the comparison below is informative

    est = hutchinson_trace(model, lambda m: lm_loss(m, batch), n_samples=n, seed=2)
    assert abs(est.mean - exact) < 4 * std / math.sqrt(n)


class BatchCurvature(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -1.0, 2.0], dtype=DT))


def batch_curvature_loss(m: BatchCurvature, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # Hessian diag(batch["c"]): Hutchinson is exact, so the weighting of batches and sources is tested exactly.
    return 0.5 * (batch["c"] * m.w**2).sum() + (batch["c"] * m.w).sum()


def test_per_source_traces_average_batches_then_weight_sources_equally():
    def b(*c):
        return {"c": torch.tensor(c, dtype=DT)}

    batches = {"code": [b(1.0, 2.0, 3.0), b(3.0, 0.0, 1.0)], "prose": [b(-1.0, 0.5, 10.0)]}
    est = per_source_traces(BatchCurvature(), batches, n_samples=3, seed=0, loss_fn=batch_curvature_loss)
    code, prose = (6.0 + 4.0) / 2, 9.5
    assert est["code"].mean == pytest.approx(code, abs=1e-12)
    assert est["prose"].mean == pytest.approx(prose, abs=1e-12)
    assert est["all"].mean == pytest.approx((code + prose) / 2, abs=1e-12)  # not batch-weighted (20.5/3)
    assert est["all"].stderr == pytest.approx(0.0, abs=1e-12)
    assert est["all"].n_samples == 3


def test_traces_are_reproducible_by_seed():
    model = MLP()
    x = torch.randn(8, 3, dtype=DT, generator=torch.Generator().manual_seed(0))

    def loss_fn(m):
        return m(x).pow(2).mean()

    a, b = hutchinson_trace(model, loss_fn, n_samples=4, seed=5), hutchinson_trace(model, loss_fn, n_samples=4, seed=5)
    c = hutchinson_trace(model, loss_fn, n_samples=4, seed=6)
    assert a == b
    assert a.mean != c.mean


def test_trace_validation():
    model = small_gpt()
    with pytest.raises(ValueError, match="n_samples"):
        hutchinson_trace(model, lambda m: lm_loss(m, lm_batches(0, 1)[0]), n_samples=1)
    with pytest.raises(ValueError, match='"all"'):
        per_source_traces(model, {"all": lm_batches(0, 1)}, n_samples=2)
    with pytest.raises(ValueError, match="without batches"):
        per_source_traces(model, {"a": []}, n_samples=2)


# ------------------------------------------------------------------------------------ fine-tune distances


def test_fine_tune_distances_match_closed_form_sgd_on_a_quadratic():
    # One batch per source: θ_K − θ* = (1 − lr·a)^K (θ₀ − θ*), θ* = target − offset.
    model = Quadratic()
    data = targets(0, n_sources=3, n_batches=1)
    steps, lr = 7, 0.3
    a, offset, theta0 = model.a, model.offset.detach(), model.theta.detach().clone()
    finals = {}
    for s, bs in data.items():
        star = bs[0]["target"] - offset
        finals[s] = star + (1 - lr * a) ** steps * (theta0 - star)

    res = fine_tune_distances(model, data, steps=steps, lr=lr, loss_fn=quad_loss)
    names = list(data)
    for s in names:
        assert res.to_start[s] == pytest.approx(float((finals[s] - theta0).norm()), rel=1e-10)
        tb = data[s][0]["target"]
        assert res.loss_before[s] == pytest.approx(quad_value(a, theta0, offset, tb), rel=1e-10)
        assert res.loss_after[s] == pytest.approx(quad_value(a, finals[s], offset, tb), rel=1e-10)
        assert res.loss_drop[s] > 0
        for t in names:
            expected = quad_value(a, finals[s], offset, data[t][0]["target"])
            assert res.cross_loss[s][t] == pytest.approx(expected, rel=1e-10)
    pairs = [(x, y) for i, x in enumerate(names) for y in names[i + 1 :]]
    for x, y in pairs:
        d = float((finals[x] - finals[y]).norm())
        assert res.pairwise[(x, y)] == pytest.approx(d, rel=1e-10)
        assert res.pairwise[(y, x)] == res.pairwise[(x, y)]  # symmetric
    assert len(res.pairwise) == 2 * len(pairs)
    assert res.mean_pairwise == pytest.approx(sum(float((finals[x] - finals[y]).norm()) for x, y in pairs) / 3)
    assert res.mean_to_start == pytest.approx(sum(float((f - theta0).norm()) for f in finals.values()) / 3)
    assert res.spread_ratio == pytest.approx(res.mean_pairwise / res.mean_to_start)


def test_fine_tune_converges_to_each_source_minimiser():
    # Many contracting steps: every copy reaches its source's known minimiser θ* = target − offset.
    model = Quadratic()
    data = targets(1, n_sources=2, n_batches=1)
    res = fine_tune_distances(model, data, steps=200, lr=0.5, loss_fn=quad_loss, cross_source=False)
    star = {s: bs[0]["target"] - model.offset.detach() for s, bs in data.items()}
    assert res.pairwise[("s0", "s1")] == pytest.approx(float((star["s0"] - star["s1"]).norm()), rel=1e-9)
    assert res.to_start["s1"] == pytest.approx(float((star["s1"] - model.theta.detach()).norm()), rel=1e-9)
    assert res.loss_after["s0"] == pytest.approx(0.0, abs=1e-12)
    assert res.cross_loss is None


def test_fine_tune_cycles_batches_in_order_like_a_hand_written_sgd_loop():
    model = Quadratic()
    data = targets(2, n_sources=2, n_batches=3)
    steps, lr = 5, 0.4  # 5 steps over 3 batches: 0,1,2,0,1 — the order matters
    a, offset, theta0 = model.a, model.offset.detach(), model.theta.detach().clone()
    finals = {}
    for s, bs in data.items():
        theta = theta0.clone()
        for k in range(steps):
            theta = theta - lr * a * (theta + offset - bs[k % len(bs)]["target"])
        finals[s] = theta

    def mean_loss(theta, bs):
        return sum(quad_value(a, theta, offset, b["target"]) for b in bs) / len(bs)

    res = fine_tune_distances(model, data, steps=steps, lr=lr, loss_fn=quad_loss)
    assert res.pairwise[("s0", "s1")] == pytest.approx(float((finals["s0"] - finals["s1"]).norm()), rel=1e-10)
    for s in data:
        assert res.to_start[s] == pytest.approx(float((finals[s] - theta0).norm()), rel=1e-10)
        assert res.loss_before[s] == pytest.approx(mean_loss(theta0, data[s]), rel=1e-10)
        assert res.cross_loss[s]["s1"] == pytest.approx(mean_loss(finals[s], data["s1"]), rel=1e-10)


def test_fine_tune_on_a_small_gpt_matches_a_hand_written_sgd_loop():
    model = small_gpt(seed=2)
    data = {"a": lm_batches(30, 2), "b": lm_batches(40, 2)}
    steps, lr = 3, 0.5
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    finals = {}
    for s, bs in data.items():
        ref = copy.deepcopy(model).eval()
        for k in range(steps):
            b = bs[k % len(bs)]
            ref.zero_grad()
            reference_lm_loss(ref(b["input_ids"]), b["labels"]).backward()
            with torch.no_grad():
                for p in ref.parameters():
                    p -= lr * p.grad
        finals[s] = {n: p.detach() for n, p in ref.named_parameters()}

    def dist(x, y):
        return math.sqrt(sum(float(((x[n] - y[n]) ** 2).sum()) for n in start))

    res = fine_tune_distances(model, data, steps=steps, lr=lr)
    assert res.to_start["a"] == pytest.approx(dist(finals["a"], start), rel=1e-8)
    assert res.pairwise[("a", "b")] == pytest.approx(dist(finals["a"], finals["b"]), rel=1e-8)
    assert all(drop > 0 for drop in res.loss_drop.values())


def test_fine_tune_validation_and_divergence():
    model = Quadratic()
    with pytest.raises(ValueError, match="at least 2"):
        fine_tune_distances(model, targets(0, 1, 1), steps=1, lr=0.1, loss_fn=quad_loss)
    with pytest.raises(ValueError, match="lr > 0"):
        fine_tune_distances(model, targets(0, 2, 1), steps=1, lr=0.0, loss_fn=quad_loss)
    with pytest.raises(FloatingPointError, match="'s0' diverged"):
        fine_tune_distances(model, targets(0, 2, 1), steps=2000, lr=5.0, loss_fn=quad_loss)


def test_results_serialise_to_json():
    res = fine_tune_distances(Quadratic(), targets(0, 3, 1), steps=2, lr=0.1, loss_fn=quad_loss)
    d = json.loads(json.dumps(res.to_dict()))
    assert set(d["pairwise"]) == {"s0__s1", "s0__s2", "s1__s2"}
    assert d["pairwise"]["s0__s2"] == res.pairwise[("s2", "s0")]
    assert d["loss_drop"] == res.loss_drop and d["optimizer"] == "sgd"
    assert isinstance(res, FineTuneDistances)
    est = TraceEstimate(mean=1.5, stderr=0.25, n_samples=4)
    assert json.loads(json.dumps(est.to_dict())) == {"mean": 1.5, "stderr": 0.25, "n_samples": 4}


# ----------------------------------------------------------------------------------- input left untouched


def snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
    }


def assert_same(before: dict, after: dict) -> None:
    assert after["requires_grad"] == before["requires_grad"]
    assert after["modes"] == before["modes"]
    for n, p in before["params"].items():
        assert torch.equal(after["params"][n], p), n
    for n, g in before["grads"].items():
        assert (after["grads"][n] is None) == (g is None), n
        if g is not None:
            assert torch.equal(after["grads"][n], g), n


def test_diagnostics_leave_model_and_global_rng_untouched():
    model = small_gpt(dropout=0.5)
    model.train()
    model.blocks[0].mlp.eval()  # mixed modes must come back as they were
    model.wpe.weight.requires_grad_(False)
    data = {"a": lm_batches(1, 1), "b": lm_batches(2, 1)}
    lm_loss(model, data["a"][0]).backward()  # existing grads must survive
    model.blocks[0].attn.c_attn.bias.grad = None  # ... and so must a missing one
    before = snapshot(model)
    rng = torch.get_rng_state()

    def noisy_loss(m, b):
        # Consumes the global RNG: the diagnostics must isolate the caller's random stream from it.
        return lm_loss(m, b) + 0 * torch.rand(())

    traces = per_source_traces(model, data, n_samples=2, seed=0, loss_fn=noisy_loss)
    hutchinson_trace(model, lambda m: noisy_loss(m, data["a"][0]), n_samples=2)
    fine_tune_distances(model, data, steps=2, lr=0.5, loss_fn=noisy_loss)

    assert_same(before, snapshot(model))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(math.isfinite(t.mean) for t in traces.values())


def test_dropout_does_not_make_diagnostics_random():
    # Eval mode inside: the numbers do not depend on the global RNG although the model has dropout and
    # is training (the RNG is advanced between calls, so equal dropout masks cannot explain equality).
    model = small_gpt(dropout=0.5).train()
    data = {"a": lm_batches(1, 1), "b": lm_batches(2, 1)}
    t1, r1 = per_source_traces(model, data, n_samples=2), fine_tune_distances(model, data, steps=2, lr=0.5)
    torch.rand(100)
    t2, r2 = per_source_traces(model, data, n_samples=2), fine_tune_distances(model, data, steps=2, lr=0.5)
    assert t1 == t2
    assert r1.to_dict() == r2.to_dict()


def test_works_inside_inference_mode():
    # Lightning runs validation hooks under inference mode; batches made there are inference tensors.
    model = small_gpt()
    with torch.inference_mode():
        data = {"a": lm_batches(1, 1), "b": lm_batches(2, 1)}
        traces = per_source_traces(model, data, n_samples=2)
        res = fine_tune_distances(model, data, steps=1, lr=0.5)
    assert res.to_start["a"] > 0 and math.isfinite(traces["all"].mean)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_trace_matches_exact_cpu_hessian_and_rng_untouched():
    model = attention_only_gpt()
    batch = lm_batches(0, 1)[0]
    H = exact_hessian(model, lambda fwd: reference_lm_loss(fwd(batch["input_ids"]), batch["labels"]))
    n = 64
    cuda_model = copy.deepcopy(model).cuda()
    rng = torch.cuda.get_rng_state()
    est = per_source_traces(cuda_model, {"a": [batch]}, n_samples=n, seed=4)["a"]
    res = fine_tune_distances(cuda_model, {"a": [batch], "b": lm_batches(2, 1)}, steps=2, lr=0.5)
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    assert abs(est.mean - float(torch.trace(H))) < 4 * hutchinson_std(H) / math.sqrt(n)
    assert res.to_start["a"] > 0 and all(drop > 0 for drop in res.loss_drop.values())


# ------------------------------------------------------------------------------- gradient alignment


def _squared_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return (model(batch["x"]).squeeze(-1) - batch["y"]).square().mean()


def test_gradient_alignment_matches_a_hand_computation():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    w = model.weight.detach().numpy().ravel().copy()
    gen = torch.Generator().manual_seed(1)
    batches = {
        s: [
            {"x": torch.randn(5, 3, generator=gen, dtype=DT), "y": torch.randn(5, generator=gen, dtype=DT)}
            for _ in range(k)
        ]
        for s, k in (("a", 2), ("b", 3), ("c", 2))
    }
    # by hand: the gradient of mean((w.x - y)^2) is (2/n) sum (w.x_i - y_i) x_i
    grads = {
        s: [2 * ((b["x"].numpy() @ w - b["y"].numpy())[:, None] * b["x"].numpy()).mean(0) for b in bs]
        for s, bs in batches.items()
    }

    def cos(u, v):
        return float(u @ v / math.sqrt((u @ u) * (v @ v)))

    names = list(grads)
    pair = {
        (a, b): sum(cos(u, v) for u in grads[a] for v in grads[b]) / (len(grads[a]) * len(grads[b]))
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }
    within = {
        s: sum(cos(g[i], g[j]) for i in range(len(g)) for j in range(len(g)) if i != j) / (len(g) * (len(g) - 1))
        for s, g in grads.items()
    }
    means = {s: sum(g) / len(g) for s, g in grads.items()}
    of_means = sum(cos(means[a], means[b]) for a, b in pair) / len(pair)

    before = copy.deepcopy(model.state_dict())
    got = gradient_alignment(model, batches, loss_fn=_squared_loss)
    assert got.cross == pytest.approx(sum(pair.values()) / len(pair), abs=1e-12)
    assert got.within == pytest.approx(sum(within.values()) / len(within), abs=1e-12)
    assert got.cross_of_means == pytest.approx(of_means, abs=1e-12)
    for (a, b), v in pair.items():
        assert got.pairs[(a, b)] == got.pairs[(b, a)] == pytest.approx(v, abs=1e-12)
    assert got.within_by_source == pytest.approx(within, abs=1e-12) and got.n_batches == {"a": 2, "b": 3, "c": 2}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.weight.grad is None
    assert json.loads(json.dumps(got.to_dict()))["pairs"]["a__b"] == pytest.approx(pair[("a", "b")])


def test_gradient_alignment_refuses_a_single_batch_per_source():
    model = nn.Linear(3, 1, bias=False).double()
    one = {"x": torch.ones(2, 3, dtype=DT), "y": torch.zeros(2, dtype=DT)}
    with pytest.raises(ValueError, match="noise floor"):
        gradient_alignment(model, {"a": [one, one], "b": [one]}, loss_fn=_squared_loss)


def test_fine_tune_curve_follows_a_hand_written_adam_loop_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    gen = torch.Generator().manual_seed(2)
    train = [
        {"x": torch.randn(4, 3, generator=gen, dtype=DT), "y": torch.randn(4, generator=gen, dtype=DT)}
        for _ in range(3)
    ]
    held = [{"x": torch.randn(6, 3, generator=gen, dtype=DT), "y": torch.randn(6, generator=gen, dtype=DT)}]
    before = copy.deepcopy(model.state_dict())

    # reference: Adam written out (bias-corrected moments, beta 0.9/0.999, eps 1e-8), on functional parameters
    params = [p.detach().clone() for p in model.parameters()]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    lr, expected = 0.05, {}

    def held_loss(ps):
        return float(((held[0]["x"] @ ps[0].T).squeeze(-1) + ps[1] - held[0]["y"]).square().mean())

    expected[0] = held_loss(params)
    for t in range(1, 7):
        b = train[(t - 1) % 3]
        ps = [p.requires_grad_(True) for p in params]
        loss = ((b["x"] @ ps[0].T).squeeze(-1) + ps[1] - b["y"]).square().mean()
        grads = torch.autograd.grad(loss, ps)
        with torch.no_grad():
            for i, g in enumerate(grads):
                m[i] = 0.9 * m[i] + 0.1 * g
                v[i] = 0.999 * v[i] + 0.001 * g * g
                mhat, vhat = m[i] / (1 - 0.9**t), v[i] / (1 - 0.999**t)
                params[i] = (ps[i] - lr * mhat / (vhat.sqrt() + 1e-8)).detach()
        if t in (2, 4, 6):
            expected[t] = held_loss(params)

    curve = fine_tune_curve(model, train, held, steps=6, lr=lr, points=3, loss_fn=_squared_loss)
    assert sorted(curve) == [0, 2, 4, 6]
    for step, loss in expected.items():
        assert curve[step] == pytest.approx(loss, rel=1e-10)
    assert all(torch.equal(before[k], w) for k, w in model.state_dict().items())
