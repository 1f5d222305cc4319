"""NexusFabric and plain PyTorch loops (GradScaler, DDP) against the independent reference in tests/helpers.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins.precision import MixedPrecision

from lightning_nexus import Nexus
from lightning_nexus.fabric import NexusFabric
from tests.helpers import assert_params_close, make_mlp, reference_nexus_training, reference_window_mode_training

ROOT = Path(__file__).resolve().parents[2]
K, N, INNER_LR = 3, 12, 0.1


def make_net():
    return make_mlp(seed=0)


def make_opt(net):
    # SGD, not Adam: Adam's update is almost invariant to the gradient's scale and would hide a G off by 2^k
    return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)


def loss_fn(out):
    return torch.nn.functional.mse_loss(out, torch.ones_like(out))


def amp_forward(net, x, dtype=torch.float16):
    """What Fabric's mixed-precision forward does: inputs cast to the low dtype, autocast, fp32 output."""
    with torch.autocast("cpu", dtype=dtype):
        return net(x.to(dtype)).float()


def worker_batches(n=N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 32, generator=gen) for _ in range(n)]


class RefModule:
    """The duck-typed module ``reference_nexus_training`` drives (training_step, configure_optimizers)."""

    def __init__(self, amp_dtype=None):
        self.net = make_net()
        self.amp_dtype = amp_dtype

    def training_step(self, x, batch_idx):
        return loss_fn(self.net(x) if self.amp_dtype is None else amp_forward(self.net, x, self.amp_dtype))

    def configure_optimizers(self):
        return make_opt(self.net)

    def zero_grad(self, set_to_none=True):
        self.net.zero_grad(set_to_none=set_to_none)


def fabric_run(batches, plugins=None, precision=None, max_norm=None, **nexus_kwargs):
    kwargs = {"plugins": plugins} if plugins is not None else {"precision": precision or "32-true"}
    fabric = Fabric(accelerator="cpu", devices=1, **kwargs)
    net = make_net()
    model, opt = fabric.setup(net, make_opt(net))
    nexus = NexusFabric(fabric, model, opt, inner_lr=nexus_kwargs.pop("inner_lr", INNER_LR), **nexus_kwargs)
    taken, after_window = [], []
    for start in range(0, len(batches), K):
        for x in batches[start : start + K]:
            nexus.backward(loss_fn(model(x)))
        taken.append(nexus.step(max_norm=max_norm))
        after_window.append([p.detach().clone() for p in net.parameters()])
    return nexus, taken, after_window


def scaler_plugin(init_scale=2.0**6):
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


@pytest.mark.parametrize("normalize", [True, False])
def test_32_true_equals_reference(normalize):
    batches = worker_batches()
    _, taken, after = fabric_run(batches, normalize=normalize, max_norm=0.5)
    want = reference_nexus_training(RefModule(), batches, K, INNER_LR, normalize, clip_norm=0.5)
    assert taken == [True] * (N // K)
    assert_params_close(after[-1], want)


def test_16_mixed_grad_scaler_hands_the_optimizer_g_in_the_scaled_domain():
    """The scaler's unscale must yield G: with G left unscaled the SGD step would be 2^6 times too small."""
    batches = worker_batches()
    plugin = scaler_plugin()
    nexus, taken, after = fabric_run(batches, plugins=[plugin], max_norm=0.5)
    want = reference_nexus_training(RefModule(torch.float16), batches, K, INNER_LR, True, clip_norm=0.5)
    assert taken == [True] * (N // K)
    assert plugin.scaler.get_scale() == 2.0**6  # no overflow, no backoff
    assert_params_close(after[-1], want, rtol=1e-3)
    # raw directions divide the scale out of every inner step
    _, _, after_raw = fabric_run(batches, plugins=[scaler_plugin()], normalize=False)
    want_raw = reference_nexus_training(RefModule(torch.float16), batches, K, INNER_LR, False)
    assert_params_close(after_raw[-1], want_raw, rtol=1e-3)


def test_bf16_mixed_equals_autocast_reference():
    batches = worker_batches()
    _, _, after = fabric_run(batches, precision="bf16-mixed")
    want = reference_nexus_training(RefModule(torch.bfloat16), batches, K, INNER_LR, True)
    assert_params_close(after[-1], want, rtol=1e-3)


@pytest.mark.parametrize("amp", [False, True])
def test_non_finite_window_is_skipped_and_the_scale_backs_off(amp):
    batches = worker_batches()
    batches[K + 1] = torch.full_like(batches[K + 1], float("inf"))  # window 2, micro-batch 2
    plugin = scaler_plugin() if amp else None
    nexus, taken, after = fabric_run(batches, plugins=[plugin] if amp else None)
    assert taken == [True, False, True, True]
    assert_params_close(after[1], after[0], rtol=0, atol=0)  # the skipped window changed nothing
    assert nexus.skipped_windows == 1 and nexus.completed_windows == 3
    assert all(torch.isfinite(p).all() for p in after[-1])
    if amp:
        assert plugin.scaler.get_scale() == 2.0**5  # backed off once (backoff_factor 0.5)


def test_step_without_backward_and_unknown_sync_are_refused():
    fabric = Fabric(accelerator="cpu", devices=1)
    net = make_net()
    model, opt = fabric.setup(net, make_opt(net))
    with pytest.raises(ValueError, match="expected 'every' or 'window'"):
        NexusFabric(fabric, model, opt, sync="always")
    with pytest.raises(RuntimeError, match="without a backward"):
        NexusFabric(fabric, model, opt).step()


def test_anchor_as_weights_holds_theta0_mid_window():
    fabric = Fabric(accelerator="cpu", devices=1)
    net = make_net()
    model, opt = fabric.setup(net, make_opt(net))
    nexus = NexusFabric(fabric, model, opt, inner_lr=INNER_LR)
    theta0 = [p.detach().clone() for p in net.parameters()]
    nexus.backward(loss_fn(model(worker_batches()[0])))
    moved = [p.detach().clone() for p in net.parameters()]
    with nexus.anchor_as_weights():
        assert_params_close(list(net.parameters()), theta0, rtol=0, atol=0)
    assert_params_close(list(net.parameters()), moved, rtol=0, atol=0)


# ---------------------------------------------------------------- plain loops through the core
def plain_amp_loop(batches, normalize=True):
    """The documented plain-loop recipe with torch.amp.GradScaler, one process."""
    net = make_net()
    opt = make_opt(net)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    nexus = Nexus(net.parameters(), inner_lr=INNER_LR, normalize=normalize, grad_scaler=scaler)
    for start in range(0, len(batches), K):
        for x in batches[start : start + K]:
            scaler.scale(loss_fn(amp_forward(net, x))).backward()
            nexus.inner_step()
        nexus.finish_window()  # .grad := G·scale
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return list(net.parameters())


@pytest.mark.parametrize("normalize", [True, False])
def test_plain_loop_with_grad_scaler_equals_reference(normalize):
    batches = worker_batches()
    want = reference_nexus_training(RefModule(torch.float16), batches, K, INNER_LR, normalize, clip_norm=0.5)
    assert_params_close(plain_amp_loop(batches, normalize), want, rtol=1e-3)


def test_core_refuses_the_scale_counted_twice():
    net = make_net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6)
    nexus = Nexus(net.parameters(), grad_scaler=scaler)
    scaler.scale(loss_fn(net(worker_batches()[0]))).backward()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match="loss_scale must be only the factor your code applied"):
        nexus.inner_step(loss_scale=scaler.get_scale() / K)
    assert_params_close(list(net.parameters()), before, rtol=0, atol=0)


# ---------------------------------------------------------------- 2 processes (gloo)
def run_worker(out, precision):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": str(30500 + os.getpid() % 1000)}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests/plugin/fabric_worker.py"), str(out), precision],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fabric_ddp")
    run_worker(out, "32-true")

    def load(case):
        return [torch.load(out / f"{case}_rank{r}.pt") for r in range(2)]

    return load


def global_batches():
    b = worker_batches()
    return [torch.cat([b[2 * i], b[2 * i + 1]]) for i in range(N // 2)]


@pytest.mark.slow
def test_fabric_sync_every_equals_one_process_on_the_global_micro_batch(two_process_results):
    rank0, rank1 = (r["params"] for r in two_process_results("fabric_every"))
    assert_params_close(rank0, rank1, rtol=0, atol=0)
    want = reference_nexus_training(RefModule(), global_batches(), K, INNER_LR, True)
    assert_params_close(rank0, want)


@pytest.mark.slow
def test_fabric_sync_window_ranks_agree_and_match_the_window_reference(two_process_results):
    rank0, rank1 = (r["params"] for r in two_process_results("fabric_window"))
    assert_params_close(rank0, rank1, rtol=0, atol=0)
    assert_params_close(
        rank0, reference_window_mode_training(RefModule(), worker_batches(), world=2, K=K, inner_lr=INNER_LR)
    )
    every = reference_nexus_training(RefModule(), global_batches(), K, INNER_LR, True)
    assert not torch.allclose(rank0[0], every[0])  # a different rule, not sync="every" by accident


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("fabric_no_backward_sync", "ran with DDP's gradient sync off"),
        ("fabric_forward_in_no_sync", "the ranks' gradient norms differ"),
        ("plain_no_sync", "the ranks' gradient norms differ"),
    ],
)
def test_gradient_sync_off_in_an_exact_window_is_refused(two_process_results, case, message):
    for rank in two_process_results(case):
        assert message in rank.get("error", ""), rank


@pytest.mark.slow
def test_plain_ddp_loop_with_grad_scaler_equals_reference(two_process_results):
    rank0, rank1 = (r["params"] for r in two_process_results("plain_every"))
    assert_params_close(rank0, rank1, rtol=0, atol=0)
    want = reference_nexus_training(RefModule(torch.float16), global_batches(), K, INNER_LR, True)
    assert_params_close(rank0, want, rtol=1e-3)


@pytest.mark.slow
def test_plain_ddp_loop_in_window_mode_matches_the_window_reference(two_process_results):
    rank0, rank1 = (r["params"] for r in two_process_results("plain_window"))
    assert_params_close(rank0, rank1, rtol=0, atol=0)
    assert_params_close(
        rank0, reference_window_mode_training(RefModule(), worker_batches(), world=2, K=K, inner_lr=INNER_LR)
    )


@pytest.mark.slow
def test_fabric_grad_scaler_backs_off_on_both_ranks_when_one_rank_overflows(tmp_path):
    """Window mode: only rank 1 abandons window 2, and the skip must reach rank 0's scaler too, or the ranks'
    loss scales (and then their G) diverge. Every mode: the all-reduced inf reaches both ranks anyway."""
    run_worker(tmp_path, "16-mixed")
    for sync in ("window", "every"):
        ranks = [torch.load(tmp_path / f"overflow_{sync}_rank{r}.pt") for r in range(2)]
        for r in ranks:
            assert r["taken"] == [True, False, True, True], sync
            assert r["scales"] == [2.0**6, 2.0**5, 2.0**5, 2.0**5], sync
            assert_params_close(r["window_params"][1], r["window_params"][0], rtol=0, atol=0)
            assert all(torch.isfinite(p).all() for p in r["params"])
        assert_params_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)
