"""The CUDA paths, each against a 32-true CUDA run or the independent reference (tests/helpers.py).

Skipped without CUDA (tests/conftest.py). Run them on a GPU machine with ``benchmarks/gpu_suite.sh``
(docs/gpu.md); each test takes seconds, ``torch.compile`` the longest.
"""

from __future__ import annotations

import contextlib

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from lightning_nexus import Nexus, NexusCallback, NexusFSDPStrategy
from lightning_nexus.monitor import GradSimilarityMonitor
from tests.helpers import MLPModule, assert_params_close, boring_batches, reference_nexus_training, shard_mlp

pytestmark = pytest.mark.gpu
K = 4
# 16-mixed: Lightning's default initial scale 2^16 overflows this MLP's fp16 weight gradients in the first
# window (a legitimate skip); a smaller one lets every window step
INIT_SCALE = 2.0**10


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    # the 32-true references must be true fp32 (no TF32), whatever the machine's defaults
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture
def _fresh_process_group():
    """FSDP on one GPU still initializes a (world size 1) process group; later tests must not inherit it."""
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class CudaMLP(MLPModule):
    """MLPModule with its target on the batch's device (the CPU tests build it on the CPU)."""

    def __init__(self, seed: int = 0, optimizer: str = "sgd", fused: bool = False) -> None:
        super().__init__(seed)
        self.optimizer_name, self.fused = optimizer, fused

    def training_step(self, batch, batch_idx):
        target = torch.ones(batch.shape[0], 2, device=batch.device)
        return torch.nn.functional.mse_loss(self.net(batch), target)

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            # eps comparable to |G|: a G handed to the fused step in the wrong (un)scaled domain would show
            return torch.optim.AdamW(self.parameters(), lr=1e-2, eps=0.05, fused=self.fused)
        return super().configure_optimizers()


class _NaNAt(CudaMLP):
    def __init__(self, bad_batch: int) -> None:
        super().__init__()
        self.bad_batch = bad_batch

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx == self.bad_batch else loss


class _Anchors(pl.Callback):
    """The parameters at every window start (θ0 of each window, i.e. after each outer step)."""

    def __init__(self) -> None:
        self.anchors: list[list[torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % K == 0:
            self.anchors.append([p.detach().float().clone() for p in pl_module.parameters()])


def _precision(precision: str) -> dict:
    if precision == "16-mixed":
        scaler = torch.amp.GradScaler("cuda", init_scale=INIT_SCALE)
        return {"plugins": [MixedPrecision("16-mixed", "cuda", scaler=scaler)]}
    return {"precision": precision}


def _fit(module, precision="32-true", callbacks=(), strategy="auto", n=12, batches=None, **kwargs):
    trainer = pl.Trainer(
        accelerator="cuda",
        devices=1,
        **_precision(precision),
        strategy=strategy,
        max_epochs=1,
        accumulate_grad_batches=K,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **kwargs,
    )
    data = batches if batches is not None else boring_batches(n=n, batch_size=16)
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    return trainer


def _displacement(module, start):
    return [p.detach().float().cpu() - s for p, s in zip(module.parameters(), start)]


def _relative_error(got, want):
    num = sum((g - w).double().square().sum() for g, w in zip(got, want)) ** 0.5
    den = sum(w.double().square().sum() for w in want) ** 0.5
    return float(num / den)


def _train_displacement(precision, normalize=True, exact=False, **module_kwargs):
    module = CudaMLP(**module_kwargs)
    start = [p.detach().float().clone() for p in module.parameters()]
    cb = NexusCallback(inner_lr=0.05, normalize=normalize, exact=exact)
    _fit(module, precision=precision, callbacks=[cb])
    assert cb.skipped_windows == 0 and cb.completed_windows == 3
    return _displacement(module, start)


# fp16 matmuls keep ~3 decimal digits and bf16 ~2: the training displacement (3 outer steps) agrees with
# fp32 to well within these bounds when every scale is handled; a mishandled loss scale is off by 2^10.
TOLERANCE = {"bf16-mixed": 0.05, "16-mixed": 0.02}


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("normalize", [True, False])
def test_mixed_precision_matches_32_true(precision, normalize):
    """Raw directions (normalize=False) need the inner gradients unscaled: 16-mixed checks that."""
    want = _train_displacement("32-true", normalize=normalize)
    got = _train_displacement(precision, normalize=normalize)
    assert _relative_error(got, want) < TOLERANCE[precision]


def test_exact_mode_matches_default_mode_on_cuda():
    want = _train_displacement("32-true")
    got = _train_displacement("bf16-mixed", exact=True)
    assert _relative_error(got, want) < TOLERANCE["bf16-mixed"]
    assert _relative_error(_train_displacement("32-true", exact=True), want) < 1e-4


def test_fused_adamw_under_16_mixed_matches_32_true():
    want = _train_displacement("32-true", optimizer="adamw", fused=False)
    got = _train_displacement("16-mixed", optimizer="adamw", fused=True)
    assert _relative_error(got, want) < 0.02


def test_16_mixed_injected_inf_skips_the_window_and_backs_the_scale_off():
    anchors, cb = _Anchors(), NexusCallback(inner_lr=0.05)
    trainer = _fit(_NaNAt(bad_batch=5), precision="16-mixed", callbacks=[cb, anchors])
    scaler = trainer.precision_plugin.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    assert cb.skipped_windows == 1 and cb.completed_windows == 2
    assert scaler.get_scale() == INIT_SCALE / 2  # halved once (it grows only after 2000 steps)
    assert_params_close(anchors.anchors[2], anchors.anchors[1], rtol=0, atol=0)  # the skipped window
    assert not torch.equal(anchors.anchors[1][0], anchors.anchors[0][0])  # the others stepped


def _reference_on_cuda(n=12, inner_lr=0.1):
    module = CudaMLP().cuda()
    batches = [b.cuda() for b in boring_batches(n=n, batch_size=16)]
    return [p.cpu() for p in reference_nexus_training(module, batches, K=K, inner_lr=inner_lr, normalize=True)]


@pytest.mark.usefixtures("_fresh_process_group")
@pytest.mark.parametrize("sharding", ["FULL_SHARD", "NO_SHARD"])
def test_nexus_fsdp1_on_one_gpu_matches_reference(sharding):
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    trainer = _fit(
        CudaMLP(),
        callbacks=[NexusCallback(inner_lr=0.1)],
        strategy=NexusFSDPStrategy(sharding_strategy=sharding),
        use_distributed_sampler=False,
    )
    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=False)
    with FSDP.state_dict_type(trainer.strategy.model, StateDictType.FULL_STATE_DICT, config):
        state = trainer.strategy.model.state_dict()
    names = [name for name, _ in CudaMLP().named_parameters()]
    assert_params_close([state[n].float().cpu() for n in names], _reference_on_cuda())


class _FSDP2MLP(CudaMLP):
    def configure_model(self):
        shard_mlp(self.net, self.device_mesh["data_parallel"])


@pytest.mark.usefixtures("_fresh_process_group")
def test_fsdp2_on_one_gpu_matches_reference():
    module = _FSDP2MLP()
    _fit(
        module,
        callbacks=[NexusCallback(inner_lr=0.1)],
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
        use_distributed_sampler=False,
    )
    got = [p.full_tensor().detach().cpu() for p in module.parameters()]
    assert_params_close(got, _reference_on_cuda())


def test_torch_compile_with_the_callback_matches_eager():
    eager = CudaMLP()
    _fit(eager, callbacks=[NexusCallback(inner_lr=0.1)])
    compiled = CudaMLP()
    compiled.net = torch.compile(compiled.net)  # the compiled forward/backward; the callback sees real params
    _fit(compiled, callbacks=[NexusCallback(inner_lr=0.1)])
    assert_params_close(
        [p.detach().cpu() for p in compiled.parameters()], [p.detach().cpu() for p in eager.parameters()], rtol=1e-4
    )
    assert_params_close([p.detach().cpu() for p in eager.parameters()], _reference_on_cuda(), rtol=1e-4)


def test_monitor_sketch_on_cuda_is_within_0_05_of_exact():
    from tests.plugin.test_monitor import Data, MemoryLogger, Sourced

    exact, sketch = GradSimilarityMonitor(mode="exact"), GradSimilarityMonitor(mode="sketch")
    results = []

    class Grab(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if exact.last is not None and (not results or results[-1][0] is not exact.last):
                results.append((exact.last, sketch.last))

    module = Sourced(hidden=2048)
    trainer = pl.Trainer(
        accelerator="cuda",
        devices=1,
        max_epochs=1,
        accumulate_grad_batches=K,
        log_every_n_steps=1,
        logger=MemoryLogger(),
        callbacks=[exact, sketch, Grab(), NexusCallback()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=Data(12))
    assert len(results) == 3
    off_diagonal = ~torch.eye(K, dtype=torch.bool)
    for e, s in results:
        err = (e.cosine.cpu() - s.cosine.cpu())[off_diagonal].abs().max().item()
        assert 0 < err < 0.05
        assert e.cosine.cpu()[off_diagonal].abs().max() > 0.1


@contextlib.contextmanager
def _sync_is_an_error():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize(
    ("normalize", "inner_lr", "exact"),
    [(True, 0.05, False), (False, 0.05, False), (True, 0.0, False), (True, 0.05, True)],
)
def test_inner_step_does_not_sync_the_gpu(normalize, inner_lr, exact):
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(s, device="cuda", generator=gen).requires_grad_() for s in ((64, 32), (32,), (8, 8, 8))]
    theta0 = [p.detach().clone() for p in params]
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    nexus = Nexus(params, inner_lr=inner_lr, normalize=normalize, exact=exact)
    for k in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=gen)
        if k == 1:
            params[0].grad[0, 0] = float("nan")
        loss_scale = scaler.scale(torch.ones((), device="cuda")) / K  # a device tensor, as the callback passes
        with _sync_is_an_error():
            nexus.inner_step(loss_scale=loss_scale)
    assert nexus.finish_window().skipped  # the NaN of micro-batch 2 is found at the window's end
    assert all(torch.equal(p, t) for p, t in zip(params, theta0))


def test_callback_micro_batches_do_not_sync_the_gpu():
    """Through Lightning under 16-mixed: the callback's on_after_backward after the window's first
    micro-batch (which checks the weights once per window) runs with CUDA syncs turned into errors."""
    cb = NexusCallback(inner_lr=0.05, normalize=False)
    hook = cb.on_after_backward
    checked = []

    def on_after_backward(trainer, pl_module):
        if cb.nexus is not None and cb.nexus.in_window:
            checked.append(trainer.global_step)
            with _sync_is_an_error():
                return hook(trainer, pl_module)
        return hook(trainer, pl_module)

    cb.on_after_backward = on_after_backward
    _fit(CudaMLP(), precision="16-mixed", callbacks=[cb])
    assert len(checked) == 3 * (K - 1) and cb.completed_windows == 3
