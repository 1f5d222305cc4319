"""The pure-torch Nexus core against slow reference implementations written here."""

import math
import threading
import warnings

import pytest
import torch

from lightning_nexus import Nexus
from tests.helpers import count_host_syncs


def reference_window(theta0, grad_fn, num_micro, inner_lr, normalize, loss_scales=None):
    """The rule of docs/update_rule.md line by line on flat float64 vectors. Returns (G, θ_K)."""
    theta = theta0.clone().double()
    directions = []
    for k in range(num_micro):
        g = grad_fn(k, theta)
        if loss_scales is not None:
            g = g * loss_scales[k]
        d = g / g.norm() if normalize else g
        directions.append(d)
        theta = theta - inner_lr * d
    return torch.stack(directions).mean(0), theta


def make_params(sizes=((5, 3), (7,), (2, 2, 2)), seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=gen, dtype=dtype).requires_grad_() for s in sizes]


def flat(tensors):
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def nonlinear_grad_fn(targets):
    """Gradient of loss_k(θ) = Σ cos(θ·a_k) + ½‖θ − b_k‖² + (1/400)‖θ − b_k‖⁴, by hand (no autograd)."""

    def grad(k, theta):
        a, b = targets[k]
        diff = theta - b
        return -torch.sin(theta * a) * a + (1 + 0.01 * diff.pow(2).sum()) * diff

    return grad


def run_core(params, grad_fn, num_micro, inner_lr, normalize, loss_scales=None):
    nexus = Nexus(params, inner_lr=inner_lr, normalize=normalize)
    for k in range(num_micro):
        g = grad_fn(k, flat(params)).float()
        if loss_scales is not None:
            g = g * loss_scales[k]
        offset = 0
        for p in params:
            p.grad = g[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        assert nexus.inner_step()
    return nexus.finish_window(), nexus


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("inner_lr", [0.0, 0.01, 0.3])
def test_window_matches_reference(normalize, inner_lr):
    params = make_params()
    theta0 = flat(params)
    gen = torch.Generator().manual_seed(1)
    targets = [
        (torch.randn(theta0.numel(), generator=gen).double(), torch.randn(theta0.numel(), generator=gen).double())
        for _ in range(4)
    ]
    grad_fn = nonlinear_grad_fn(targets)
    result, _ = run_core(params, grad_fn, 4, inner_lr, normalize)
    want_g, _ = reference_window(theta0, grad_fn, 4, inner_lr, normalize)
    assert result.num_micro_batches == 4 and not result.skipped
    torch.testing.assert_close(flat(params), theta0, rtol=0, atol=0)  # back at the anchor, bit for bit
    got_g = flat([p.grad for p in params])
    # G = (θ0 − θ_K)/(γK) in fp32 loses ~ulp(θ)/γ: relative 1e-5 at these magnitudes
    torch.testing.assert_close(got_g, want_g, rtol=2e-5, atol=2e-5 * want_g.abs().max().item())


def test_loss_scale_is_divided_out_in_raw_mode():
    params = make_params()
    theta0 = flat(params)
    grad_fn = nonlinear_grad_fn([(torch.ones_like(theta0), torch.zeros_like(theta0))] * 3)
    scales = [8.0, 8.0, 8.0]
    nexus = Nexus(params, inner_lr=0.05, normalize=False)
    for k in range(3):
        g = grad_fn(k, flat(params)).float() * scales[k]
        offset = 0
        for p in params:
            p.grad = g[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        nexus.inner_step(loss_scale=scales[k])
    nexus.finish_window()
    want_g, _ = reference_window(theta0, grad_fn, 3, 0.05, normalize=False)
    torch.testing.assert_close(flat([p.grad for p in params]), want_g, rtol=1e-4, atol=1e-5)


def test_normalized_mode_is_invariant_to_per_micro_batch_loss_scaling():
    theta0 = flat(make_params())
    gen = torch.Generator().manual_seed(2)
    targets = [
        (torch.randn(theta0.numel(), generator=gen).double(), torch.randn(theta0.numel(), generator=gen).double())
        for _ in range(3)
    ]
    grad_fn = nonlinear_grad_fn(targets)
    a, b = make_params(), make_params()
    run_core(a, grad_fn, 3, 0.1, True)
    run_core(b, grad_fn, 3, 0.1, True, loss_scales=[0.01, 7.0, 300.0])  # scaled losses, same directions
    torch.testing.assert_close(flat([p.grad for p in a]), flat([p.grad for p in b]), rtol=1e-5, atol=1e-7)


def test_raw_mode_matches_second_order_expansion_on_a_quadratic():
    """For loss_k = ½(θ−c_k)ᵀH(θ−c_k) and raw inner SGD, G = ḡ − (γ/K)·Σ_{i<j} H g_i + O(γ²).

    The −γ cross-term is what rewards aligned gradients: it is computed here independently and the
    remainder must shrink like γ² (halving γ quarters it)."""
    n, K = 6, 4
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(n, n, generator=gen, dtype=torch.float64)
    H = A @ A.T / n + torch.eye(n, dtype=torch.float64)
    centers = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(K)]
    theta0 = torch.randn(n, generator=gen, dtype=torch.float64)

    def grad_fn(k, theta):
        return H @ (theta.double() - centers[k])

    g0 = [grad_fn(k, theta0) for k in range(K)]
    mean_g = torch.stack(g0).mean(0)
    cross = sum(H @ g0[i] for j in range(K) for i in range(j))

    def remainder(gamma):
        params = [theta0.clone().requires_grad_()]
        nexus = Nexus(params, inner_lr=gamma, normalize=False)
        for k in range(K):
            params[0].grad = grad_fn(k, params[0].detach())
            nexus.inner_step()
        nexus.finish_window()
        expansion = mean_g - gamma / K * cross
        first_order_effect = (gamma / K * cross).norm()
        return (params[0].grad - expansion).norm().item(), first_order_effect.item()

    r1, effect = remainder(1e-2)
    r2, _ = remainder(5e-3)
    assert r1 < 0.05 * effect  # the cross-term is the leading correction
    assert r2 / r1 == pytest.approx(0.25, rel=0.05)  # what is left is second order


def test_gamma_zero_gives_mean_normalized_gradient_at_anchor():
    params = make_params()
    theta0 = flat(params)
    grads = [torch.randn(theta0.numel(), generator=torch.Generator().manual_seed(k)) for k in range(3)]
    nexus = Nexus(params, inner_lr=0.0)
    for g in grads:
        offset = 0
        for p in params:
            p.grad = g[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        nexus.inner_step()
        assert torch.equal(flat(params), theta0)  # γ = 0: nothing moves
    nexus.finish_window()
    want = torch.stack([g.double() / g.double().norm() for g in grads]).mean(0)
    torch.testing.assert_close(flat([p.grad for p in params]), want, rtol=1e-6, atol=1e-7)


def test_partial_window_averages_over_micro_batches_seen():
    params = make_params()
    theta0 = flat(params)
    gen = torch.Generator().manual_seed(4)
    targets = [
        (torch.randn(theta0.numel(), generator=gen).double(), torch.randn(theta0.numel(), generator=gen).double())
        for _ in range(2)
    ]
    grad_fn = nonlinear_grad_fn(targets)
    result, _ = run_core(params, grad_fn, 2, 0.05, True)
    want_g, _ = reference_window(theta0, grad_fn, 2, 0.05, True)
    assert result.num_micro_batches == 2
    torch.testing.assert_close(flat([p.grad for p in params]), want_g, rtol=2e-5, atol=1e-6)


def test_missing_gradients_contribute_zero_and_untouched_params_keep_none():
    a, b, c = (torch.randn(4).requires_grad_() for _ in range(3))
    nexus = Nexus([a, b, c], inner_lr=0.1, normalize=True)
    ga1, gb1 = torch.randn(4), torch.randn(4)
    a.grad, b.grad = ga1.clone(), gb1.clone()  # micro-batch 1: a and b
    nexus.inner_step()
    ga2 = torch.randn(4)
    a.grad = ga2.clone()  # micro-batch 2: only a
    nexus.inner_step()
    nexus.finish_window()
    n1 = torch.cat([ga1, gb1]).norm()
    torch.testing.assert_close(a.grad, (ga1 / n1 + ga2 / ga2.norm()) / 2, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b.grad, (gb1 / n1) / 2, rtol=1e-4, atol=1e-6)
    assert c.grad is None


def test_non_finite_gradient_abandons_window_and_next_window_trains():
    params = make_params()
    theta0 = flat(params)
    nexus = Nexus(params, inner_lr=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    assert nexus.inner_step()
    assert not torch.equal(flat(params), theta0)  # moved
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad[2] = float("nan")
    nexus.inner_step()  # detected on the device: no host sync, the window ends in finish_window
    for p in params:  # later micro-batches of the dead window change nothing
        p.grad = torch.randn_like(p)
    nexus.inner_step()
    result = nexus.finish_window()
    assert result.skipped
    assert torch.equal(flat(params), theta0)  # back at the anchor, bit for bit
    assert not all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)  # GradScaler skips
    # next window is normal
    for p in params:
        p.grad = torch.ones_like(p)
    assert nexus.inner_step()
    result = nexus.finish_window()
    assert not result.skipped and result.num_micro_batches == 1
    expected = 1 / math.sqrt(theta0.numel())
    torch.testing.assert_close(flat([p.grad for p in params]), torch.full_like(theta0, expected), rtol=1e-4, atol=1e-6)


def test_abandoned_window_leaves_nan_for_grad_scaler():
    params = make_params()
    nexus = Nexus(params, inner_lr=0.1)
    for p in params:
        p.grad = torch.full_like(p, 1e30)  # finite elements, but the norm overflows fp32
    nexus.inner_step()
    assert nexus.finish_window().skipped
    assert not all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    assert any(p.grad is not None for p in params)


def test_low_precision_parameters_that_erase_the_inner_step_are_refused():
    params = [torch.full((1000,), 3.0, dtype=torch.bfloat16).requires_grad_()]
    nexus = Nexus(params, inner_lr=1e-3)  # per element γ/√n ≈ 3e-5, far below bf16's ulp at 3.0
    params[0].grad = torch.randn(1000, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bf16-mixed"):
        nexus.inner_step()
    assert torch.equal(params[0].detach(), torch.full((1000,), 3.0, dtype=torch.bfloat16))


def test_low_precision_parameters_with_a_visible_step_pass():
    params = [torch.full((10,), 0.01, dtype=torch.bfloat16).requires_grad_()]
    nexus = Nexus(params, inner_lr=0.5)
    params[0].grad = torch.ones(10, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nexus.inner_step()


def test_invalid_arguments():
    with pytest.raises(ValueError, match="inner_lr"):
        Nexus([torch.zeros(1, requires_grad=True)], inner_lr=-0.1)
    with pytest.raises(ValueError, match="inner_lr"):
        Nexus([torch.zeros(1, requires_grad=True)], inner_lr=float("nan"))
    with pytest.raises(ValueError, match="no trainable"):
        Nexus([torch.zeros(1)], inner_lr=0.1)


def test_plain_pytorch_loop_matches_reference_training():
    """The README's plain-loop recipe, against the rule written out with autograd on a copy."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    ref = [p.detach().clone().double() for p in model.parameters()]
    data = [(torch.randn(5, 4), torch.randn(5, 1)) for _ in range(12)]
    K, gamma, lr = 3, 0.05, 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    nexus = Nexus(model.parameters(), inner_lr=gamma)
    for w in range(0, len(data), K):
        for x, y in data[w : w + K]:
            torch.nn.functional.mse_loss(model(x), y).backward()
            nexus.inner_step()
        assert not nexus.finish_window().skipped
        opt.step()
        opt.zero_grad()

    # reference: functional forward on float64 copies, SGD with momentum by hand
    def loss_of(ps, x, y):
        h = torch.tanh(x.double() @ ps[0].T + ps[1])
        return torch.nn.functional.mse_loss(h @ ps[2].T + ps[3], y.double())

    momentum = [torch.zeros_like(p) for p in ref]
    for w in range(0, len(data), K):
        theta = [p.clone() for p in ref]
        ds = []
        for x, y in data[w : w + K]:
            ps = [t.clone().requires_grad_() for t in theta]
            g = torch.autograd.grad(loss_of(ps, x, y), ps)
            norm = torch.sqrt(sum((gi**2).sum() for gi in g))
            d = [gi / norm for gi in g]
            ds.append(d)
            theta = [t - gamma * di for t, di in zip(theta, d)]
        G = [sum(d[i] for d in ds) / len(ds) for i in range(len(ref))]
        momentum = [0.9 * m + gi for m, gi in zip(momentum, G)]
        ref = [p - lr * m for p, m in zip(ref, momentum)]
    for got, want in zip(model.parameters(), ref):
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- plain-tensor shards (FSDP1): shard_group


class _ThreadGroup:
    """A process group whose ranks are threads of this process: ``all_reduce`` sums the members' tensors."""

    def __init__(self, size: int):
        self._barrier = threading.Barrier(size, timeout=20)  # a rank that skips a collective breaks it, no hang
        self._parts: dict[int, torch.Tensor] = {}

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self._parts[threading.get_ident()] = tensor.clone()
        self._barrier.wait()
        total = sum(self._parts.values())
        self._barrier.wait()  # everyone has summed before anyone posts its next part
        tensor.copy_(total)

    def wait(self) -> None:
        self._barrier.wait()


def run_sharded_window(monkeypatch, shard_group_given: bool, num_micro=4, inner_lr=0.1, lr=0.1):
    """Two simulated ranks hold FSDP1-style shards of make_params(): one tensor per parameter, the part of
    the flat parameter that falls into the rank's half (0-sized where none does, with .grad None). Rank 0
    also gets no gradient at all in micro-batch 2 (its only parameter unused), yet must join the reduction.

    Returns the full G (concatenated from the shards), the reference G, and per rank θ after finish_window,
    pseudo_grad_norm() and distance_to_anchor() after an SGD step θ −= lr·G.
    """
    group = _ThreadGroup(2)
    monkeypatch.setattr(
        torch.distributed, "all_reduce", lambda t, op=None, group=None, async_op=False: group.all_reduce(t)
    )
    full = make_params()  # 15 + 7 + 8 elements: rank 0 holds [0, 15), rank 1 [15, 30)
    theta0 = flat(full)
    bounds = [(0, 15), (15, 30)]
    spans = [(0, 15), (15, 22), (22, 30)]  # the parameters' places in the flat parameter

    def piece(a, b, lo, hi):  # the part of [a, b) inside [lo, hi), possibly empty
        start = min(max(a, lo), hi)
        return theta0[start : max(min(b, hi), start)].float().clone().requires_grad_()

    shards = [[piece(a, b, lo, hi) for a, b in spans] for lo, hi in bounds]
    gen = torch.Generator().manual_seed(7)
    targets = [
        (torch.randn(30, generator=gen).double(), torch.randn(30, generator=gen).double()) for _ in range(num_micro)
    ]
    nonlinear = nonlinear_grad_fn(targets)

    def grad_fn(k, theta):
        g = nonlinear(k, theta)
        if k == 2:
            g[:15] = 0  # micro-batch 2 leaves the first parameter unused
        return g

    results: list[dict] = [{}, {}]
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            mine, (lo, hi) = shards[r], bounds[r]
            nexus = Nexus(mine, inner_lr=inner_lr, shard_group=group if shard_group_given else None)
            for k in range(num_micro):
                group.wait()  # both ranks finished step k-1: the "all-gather" below sees θ_{k-1}
                g = grad_fn(k, torch.cat([t.detach().double() for ts in shards for t in ts]))[lo:hi].float()
                group.wait()  # both have read θ before either moves its shard
                offset = 0
                for t in mine:
                    unused = k == 2 and r == 0
                    t.grad = None if t.numel() == 0 or unused else g[offset : offset + t.numel()].clone()
                    offset += t.numel()
                assert nexus.inner_step()
            nexus.finish_window()
            results[r]["grad"] = torch.cat([t.grad if t.grad is not None else torch.zeros_like(t) for t in mine])
            results[r]["theta"] = torch.cat([t.detach() for t in mine])
            results[r]["pseudo_grad_norm"] = nexus.pseudo_grad_norm()
            with torch.no_grad():
                for t in mine:
                    if t.grad is not None:
                        t.sub_(lr * t.grad)
            results[r]["distance"] = nexus.distance_to_anchor()
        except BaseException as e:
            errors.append(e)
            group._barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    want_g, _ = reference_window(theta0, grad_fn, num_micro, inner_lr, normalize=True)
    got_g = torch.cat([results[0]["grad"], results[1]["grad"]]).double()
    theta = torch.cat([results[0]["theta"], results[1]["theta"]]).double()
    return got_g, want_g, theta, theta0, results


def test_shard_group_makes_norms_global_over_plain_tensor_shards(monkeypatch):
    got_g, want_g, theta, theta0, results = run_sharded_window(monkeypatch, shard_group_given=True)
    torch.testing.assert_close(theta, theta0, rtol=0, atol=0)  # back at the anchor on both ranks
    torch.testing.assert_close(got_g, want_g, rtol=2e-5, atol=2e-5 * want_g.abs().max().item())
    for r in range(2):  # every rank reports the global norms, not its shard's
        assert results[r]["pseudo_grad_norm"] == pytest.approx(want_g.norm().item(), rel=1e-5)
        assert results[r]["distance"] == pytest.approx(0.1 * want_g.norm().item(), rel=1e-5)


def test_without_shard_group_plain_tensor_shards_get_local_norms(monkeypatch):
    # the failure shard_group exists for: each rank normalizes by its own shard's norm
    got_g, want_g, _, _, _ = run_sharded_window(monkeypatch, shard_group_given=False)
    assert (got_g - want_g).norm() > 0.1 * want_g.norm()


# ---------------------------------------------------------------- no host sync per micro-batch; exact mode


def _fill_grads(params, seed, nan=False):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    if nan:
        params[1].grad[0] = float("nan")


@pytest.mark.parametrize(
    ("normalize", "inner_lr", "exact", "tensor_scale"),
    [(True, 0.1, False, False), (True, 0.0, False, False), (False, 0.1, False, True), (True, 0.1, True, True)],
)
@pytest.mark.parametrize("bad_micro_batch", [None, 1])
def test_inner_step_never_syncs_and_finish_window_syncs_once(
    monkeypatch, normalize, inner_lr, exact, tensor_scale, bad_micro_batch
):
    params = make_params()
    theta0 = flat(params)
    nexus = Nexus(params, inner_lr=inner_lr, normalize=normalize, exact=exact)
    scale = torch.tensor(0.25) if tensor_scale else 0.25
    for k in range(3):
        _fill_grads(params, k, nan=k == bad_micro_batch)
        with count_host_syncs(monkeypatch) as syncs:
            assert nexus.inner_step(loss_scale=scale)
        assert syncs == [], f"inner_step {k} copied to the host: {syncs}"
    with count_host_syncs(monkeypatch) as syncs:
        result = nexus.finish_window()
    assert len(syncs) <= 1, syncs
    assert result.skipped == (bad_micro_batch is not None)
    assert torch.equal(flat(params), theta0)  # θ0 restored, bit for bit, either way


def test_callback_takes_its_inner_steps_without_host_sync(monkeypatch):
    """Through Lightning, 16-mixed with a GradScaler and raw directions (the scale is divided out): the
    callback's on_after_backward syncs only in its once-per-window weight check, never per micro-batch."""
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import MixedPrecision

    from lightning_nexus import NexusCallback
    from tests.helpers import boring_batches, fit

    cb = NexusCallback(inner_lr=0.05, normalize=False)
    counts = {"hook": 0, "weight_check": 0, "weight_check_calls": 0, "micro_batches": 0}

    def counting(method, key):
        def wrapped(*args, **kwargs):
            with count_host_syncs(monkeypatch) as syncs:
                out = method(*args, **kwargs)
            counts[key] += len(syncs)
            return out

        return wrapped

    on_after_backward, check = cb.on_after_backward, cb._check_weights_finite

    def check_counted(*args, **kwargs):
        counts["weight_check_calls"] += 1
        return counting(check, "weight_check")(*args, **kwargs)

    def hook(*args, **kwargs):
        counts["micro_batches"] += 1
        return counting(on_after_backward, "hook")(*args, **kwargs)

    cb._check_weights_finite = check_counted
    cb.on_after_backward = hook
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    fit(
        pl.demos.boring_classes.BoringModel(),
        boring_batches(n=8),
        K=4,
        callbacks=[cb],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    assert counts["micro_batches"] == 8 and cb.completed_windows == 2
    assert counts["weight_check_calls"] == 2  # once per window
    assert counts["hook"] - counts["weight_check"] == 0, counts


def _large_weights(seed=0, offset=4.0):
    """Weights far from zero (|θ| ≈ 4, like an N(0, 1) embedding's tail): γ·d is a few ulps of them."""
    return [(p.detach() + offset).requires_grad_() for p in make_params(sizes=((40, 30), (200,)), seed=seed)]


def _window_error(exact, inner_lr, normalize=True):
    params = _large_weights()
    theta0 = flat(params)
    gen = torch.Generator().manual_seed(5)
    targets = [
        (torch.randn(theta0.numel(), generator=gen).double(), torch.randn(theta0.numel(), generator=gen).double())
        for _ in range(4)
    ]
    grad_fn = nonlinear_grad_fn(targets)
    nexus = Nexus(params, inner_lr=inner_lr, normalize=normalize, exact=exact)
    for k in range(4):
        g = grad_fn(k, flat(params)).float()
        offset = 0
        for p in params:
            p.grad = g[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        nexus.inner_step()
    assert not nexus.finish_window().skipped
    assert torch.equal(flat(params), theta0)
    # the reference follows the fp32 trajectory's gradients only to first order: compare G's, not θ_K's
    want_g, _ = reference_window(theta0, grad_fn, 4, inner_lr, normalize)
    got_g = flat([p.grad for p in params])
    return ((got_g - want_g).norm() / want_g.norm()).item()


@pytest.mark.parametrize(("normalize", "inner_lr"), [(True, 0.002), (True, 0.05), (False, 1e-5)])
def test_exact_mode_matches_reference_where_the_read_off_cannot(normalize, inner_lr):
    exact = _window_error(True, inner_lr, normalize)
    assert exact < 1e-6  # fp32 sums of d_k: rounding of the directions only
    if normalize and inner_lr == 0.002:
        # the default reads G off fp32 weights near 4: ~ulp(4)/(2γ√n)-sized errors per entry, well above 1e-5
        assert _window_error(False, inner_lr, normalize) > 1e-5 > 10 * exact


def test_exact_mode_window_resumes_from_its_state():
    """A window saved mid-way with window_state and continued in a fresh core ends where the
    uninterrupted one does: the direction sum travels with it."""

    def run(split):
        params = _large_weights()
        nexus = Nexus(params, inner_lr=0.01, exact=True)
        for k in range(4):
            if k == split:
                state = nexus.window_state()
                theta_k = [p.detach().clone() for p in params]
                anchor = [a.clone() for a in nexus.anchor()]
                with torch.no_grad():  # the checkpoint's weights are θ0
                    for p, a in zip(params, anchor):
                        p.copy_(a)
                nexus = Nexus(params, inner_lr=0.01, exact=True)
                nexus.load_window_state(state)
                assert all(torch.equal(p, t) for p, t in zip(params, theta_k))
            _fill_grads(params, 10 + k)
            nexus.inner_step()
        nexus.finish_window()
        return flat([p.grad for p in params])

    torch.testing.assert_close(run(split=2), run(split=None), rtol=0, atol=0)


def test_normalized_direction_has_unit_norm_on_a_large_cpu_tensor():
    """CPU fp32 reductions accumulate sequentially: a plain norm of 8M entries is ~0.1% off. The core's norm
    is not, so one normalized step moves by γ and G = d has norm 1."""
    p = torch.zeros(8 * 2**20, requires_grad=True)
    nexus = Nexus([p], inner_lr=0.0)
    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 1e-3
    nexus.inner_step()
    nexus.finish_window()
    assert p.grad.double().norm().item() == pytest.approx(1.0, abs=1e-6)
