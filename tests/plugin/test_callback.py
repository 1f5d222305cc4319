"""NexusCallback inside Lightning's automatic optimization, against the plain-loop reference."""

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins.environments import LightningEnvironment
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

from lightning_nexus import NexusCallback
from lightning_nexus.data import per_source_dataloader
from tests.helpers import (
    assert_params_close,
    boring_batches,
    clone_module,
    fit,
    make_boring,
    make_transformer,
    params_of,
    reference_nexus_training,
    transformer_batches,
)

# γ ∈ {0, small, large}; "large" is relative to the step a direction makes: a normalized step moves exactly
# γ, a raw one γ·‖g‖ (‖g‖ ≈ 1-3 here), so raw mode's large γ is smaller.
CASES = [(True, 0.0), (True, 0.01), (True, 0.5), (False, 0.0), (False, 0.01), (False, 0.1)]


@pytest.mark.parametrize(("normalize", "inner_lr"), CASES)
def test_boring_model_matches_reference(normalize, inner_lr):
    batches = boring_batches(n=10)  # K=4: windows of 4, 4 and a partial 2
    module = make_boring()
    reference = clone_module(module)
    fit(module, batches, K=4, callbacks=[NexusCallback(inner_lr=inner_lr, normalize=normalize)])
    want = reference_nexus_training(reference, batches, K=4, inner_lr=inner_lr, normalize=normalize)
    assert_params_close(params_of(module), want)


@pytest.mark.parametrize(("normalize", "inner_lr"), CASES)
def test_lightning_transformer_matches_reference(normalize, inner_lr):
    """In float64: here raw inner SGD amplifies fp32 rounding (Lightning's loss/K, θ0 − θ_K) to ~5e-5
    relative, which would hide real errors; in float64 the rule itself must agree to 1e-9."""
    batches = transformer_batches(n=6)
    module = make_transformer().double()
    reference = clone_module(module)
    fit(module, batches, K=3, callbacks=[NexusCallback(inner_lr=inner_lr, normalize=normalize)], precision="64-true")
    want = reference_nexus_training(reference, batches, K=3, inner_lr=inner_lr, normalize=normalize)
    assert_params_close(params_of(module), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("normalize", "inner_lr"), [(True, 0.01), (True, 0.5), (False, 0.0)])
def test_lightning_transformer_matches_reference_in_fp32(normalize, inner_lr):
    batches = transformer_batches(n=6)
    module = make_transformer()
    reference = clone_module(module)
    fit(module, batches, K=3, callbacks=[NexusCallback(inner_lr=inner_lr, normalize=normalize)])
    want = reference_nexus_training(reference, batches, K=3, inner_lr=inner_lr, normalize=normalize)
    assert_params_close(params_of(module), want, rtol=1e-5)


def test_gradient_clipping_applies_to_the_pseudo_gradient():
    batches = boring_batches(n=8)
    module = make_boring()
    reference = clone_module(module)
    fit(module, batches, K=4, callbacks=[NexusCallback(inner_lr=0.1)], gradient_clip_val=0.05)
    want = reference_nexus_training(reference, batches, K=4, inner_lr=0.1, normalize=True, clip_norm=0.05)
    assert_params_close(params_of(module), want)


def test_raw_mode_with_zero_inner_lr_equals_plain_accumulation():
    batches = boring_batches(n=12)
    with_cb, without = make_boring(), make_boring()
    fit(with_cb, batches, K=3, callbacks=[NexusCallback(inner_lr=0.0, normalize=False)])
    fit(without, batches, K=3)
    assert_params_close(params_of(with_cb), params_of(without), rtol=1e-6, atol=1e-8)


class _RecordAnchors(pl.Callback):
    def __init__(self, K):
        self.K, self.anchors = K, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % self.K == 0:
            self.anchors[batch_idx] = params_of(pl_module)


class _NaNOnBatch(BoringModel):
    def __init__(self, bad_batch):
        super().__init__()
        self.bad_batch = bad_batch

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if batch_idx == self.bad_batch:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_window_with_nan_is_skipped_and_training_continues():
    torch.manual_seed(0)
    module = _NaNOnBatch(bad_batch=5)
    recorder = _RecordAnchors(K=4)
    cb = NexusCallback(inner_lr=0.1)
    batches = boring_batches(n=12)
    reference = clone_module(module)
    reference.bad_batch = -1
    fit(module, batches, K=4, callbacks=[cb, recorder])
    assert cb.skipped_windows == 1 and cb.completed_windows == 2
    assert_params_close(recorder.anchors[8], recorder.anchors[4], rtol=0, atol=0)  # window 2 changed nothing
    final = params_of(module)
    assert all(torch.isfinite(p).all() for p in final)
    # windows 1 and 3 trained exactly as the reference does without window 2
    want = reference_nexus_training(reference, batches, K=4, inner_lr=0.1, normalize=True, skip_windows=(1,))
    assert_params_close(final, want)


def test_grad_scaler_skips_window_and_backs_off():
    torch.manual_seed(0)
    module = _NaNOnBatch(bad_batch=5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    cb = NexusCallback(inner_lr=0.1)
    recorder = _RecordAnchors(K=4)
    fit(
        module,
        boring_batches(n=12),
        K=4,
        callbacks=[cb, recorder],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    assert cb.skipped_windows == 1
    assert scaler.get_scale() == 2.0**9  # backed off once, exactly like a skipped AdamW step
    assert_params_close(recorder.anchors[8], recorder.anchors[4], rtol=0, atol=0)
    assert not torch.equal(recorder.anchors[4][0], recorder.anchors[0][0])  # the other windows stepped


class _OtherRankAbandons(pl.Callback):
    """Stands in for NexusDDPStrategy(sync="window") when another rank abandoned window ``window``: the
    window all-reduce reports a skip although this rank's own gradients were finite."""

    def __init__(self, window):
        self.window = window

    def setup(self, trainer, pl_module, stage):
        windows = iter(range(10**6))
        trainer.strategy.reduce_window = lambda params, skipped: next(windows) == self.window or skipped
        trainer.strategy.nexus_shard_group = lambda params: None  # with reduce_window: a NexusStrategy


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_backs_off_when_only_another_rank_abandoned(fused):
    """Every rank's scaler must back off as on the abandoning rank, or the ranks' loss scales diverge.
    A fused optimizer is not unscaled before step(), so it takes the scaler's other code path."""

    class Model(BoringModel):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, fused=fused)

    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    cb = NexusCallback(inner_lr=0.1)
    recorder = _RecordAnchors(K=4)
    fit(
        Model(),
        boring_batches(n=12),
        K=4,
        callbacks=[cb, recorder, _OtherRankAbandons(window=1)],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    assert cb.skipped_windows == 1 and cb.completed_windows == 2
    assert scaler.get_scale() == 2.0**9
    assert_params_close(recorder.anchors[8], recorder.anchors[4], rtol=0, atol=0)
    assert not torch.equal(recorder.anchors[4][0], recorder.anchors[0][0])


def test_grad_scaler_path_equals_full_precision_path():
    """The scaler multiplies every inner gradient by 2^10; Nexus must divide it out (raw mode shows it)."""
    batches = boring_batches(n=8)
    scaled, plain = make_boring(), make_boring()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    fit(
        scaled,
        batches,
        K=4,
        callbacks=[NexusCallback(inner_lr=0.05, normalize=False)],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    fit(plain, batches, K=4, callbacks=[NexusCallback(inner_lr=0.05, normalize=False)])
    assert_params_close(params_of(scaled), params_of(plain), rtol=2e-2, atol=2e-3)  # fp16 autocast noise


class _SaveAt(pl.Callback):
    def __init__(self, batch_idx, path):
        self.batch_idx, self.path = batch_idx, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch_idx:
            trainer.save_checkpoint(self.path)


def test_mid_window_checkpoint_stores_anchor_and_resumes(tmp_path):
    batches = boring_batches(n=12)
    path = tmp_path / "mid.ckpt"
    recorder = _RecordAnchors(K=4)
    cb = NexusCallback(inner_lr=0.2)
    module = make_boring()
    fit(module, batches, K=4, callbacks=[cb, recorder, _SaveAt(batch_idx=5, path=path)])
    ckpt = torch.load(path, weights_only=False)
    saved = [ckpt["state_dict"][name] for name, _ in module.named_parameters()]
    assert_params_close(saved, recorder.anchors[4], rtol=0, atol=0)  # θ0 of window 2, not θ_2
    assert ckpt["callbacks"]["NexusCallback"]["window_position"] == 2

    # Resumed with a loader that resumes mid-epoch, the run ends where the uninterrupted one does.
    def run(module, callbacks, ckpt_path=None):
        rows = [row for batch in batches for row in batch]  # the same micro-batches, from a stateful loader
        loader = per_source_dataloader({"all": rows}, batch_size=2, schedule="round_robin", seed=0)
        trainer = pl.Trainer(
            accelerator="cpu", max_epochs=1, accumulate_grad_batches=4, callbacks=callbacks, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
        return trainer.global_step, params_of(module)

    path2 = tmp_path / "mid_stateful.ckpt"
    steps_full, full = run(make_boring(), [NexusCallback(inner_lr=0.2)])
    run(make_boring(), [NexusCallback(inner_lr=0.2), _SaveAt(batch_idx=5, path=path2)])
    steps_resumed, resumed = run(make_boring(seed=1), [NexusCallback(inner_lr=0.2)], ckpt_path=path2)
    assert steps_resumed == steps_full
    assert_params_close(resumed, full, rtol=0, atol=1e-6)


def test_validation_mid_window_sees_the_anchor_and_leaves_training_alone():
    seen = {}

    class _Probe(pl.Callback):
        def on_validation_epoch_start(self, trainer, pl_module):
            seen["val"] = params_of(pl_module)

    def run(validate):
        recorder = _RecordAnchors(K=4)
        module = make_boring()
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=2,
            accumulate_grad_batches=4,
            val_check_interval=6,
            limit_val_batches=1 if validate else 0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            callbacks=[NexusCallback(inner_lr=0.3), recorder, _Probe()],
        )
        loader = torch.utils.data.DataLoader(boring_batches(n=8), batch_size=None)
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
        return recorder, params_of(module)

    recorder, with_val = run(validate=True)
    assert_params_close(seen["val"], recorder.anchors[4], rtol=0, atol=0)  # batch 6 is mid window 2
    _, without_val = run(validate=False)
    assert_params_close(with_val, without_val, rtol=0, atol=0)  # the inner trajectory was put back


# ---------------------------------------------------------------- clear errors


def test_negative_inner_lr_is_refused():
    with pytest.raises(ValueError, match="inner_lr must be a finite number >= 0"):
        NexusCallback(inner_lr=-0.01)


def test_manual_optimization_is_refused_with_the_fix():
    class Manual(BoringModel):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(RuntimeError, match="lightning_nexus.Nexus"):
        fit(Manual(), boring_batches(n=4), K=1, callbacks=[NexusCallback()])


def _fake_trainer(strategy, K=4):
    return SimpleNamespace(strategy=strategy, accumulate_grad_batches=K, callbacks=[])


def test_deepspeed_is_refused():
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # deepspeed itself need not be installed
    with pytest.raises(RuntimeError, match="DeepSpeed"):
        NexusCallback().setup(_fake_trainer(strategy), BoringModel(), "fit")


@pytest.mark.parametrize("strategy_cls", [FSDPStrategy, type("UserFSDP", (FSDPStrategy,), {})])
def test_stock_fsdp1_is_refused_naming_nexus_fsdp(strategy_cls):
    # the stock strategy skips the reduce-scatter on non-boundary micro-batches (no_sync); so does a user's
    # subclass, e.g. one that only makes FSDP1 run on CPU
    with pytest.raises(RuntimeError, match="strategy='nexus_fsdp'"):
        NexusCallback().setup(_fake_trainer(strategy_cls()), BoringModel(), "fit")


def test_plain_ddp_with_several_processes_is_refused():
    env = LightningEnvironment()
    env.set_world_size(2)
    strategy = DDPStrategy(cluster_environment=env)
    assert strategy.world_size == 2
    with pytest.raises(RuntimeError, match="nexus_ddp"):
        NexusCallback().setup(_fake_trainer(strategy), BoringModel(), "fit")


def test_plain_ddp_with_one_process_is_fine():
    strategy = DDPStrategy(cluster_environment=LightningEnvironment())
    NexusCallback().setup(_fake_trainer(strategy), BoringModel(), "fit")


def test_no_accumulation_warns():
    with pytest.warns(UserWarning, match="degenerates to normalized-gradient"):
        fit(make_boring(), boring_batches(n=2), K=1, callbacks=[NexusCallback()])


def test_bf16_true_with_an_invisible_inner_step_is_refused():
    module = make_boring()
    with pytest.raises(RuntimeError, match="bf16-mixed"):
        fit(module, boring_batches(n=4), K=2, callbacks=[NexusCallback(inner_lr=1e-5)], precision="bf16-true")


@pytest.mark.filterwarnings("ignore:NexusCallback with accumulate_grad_batches=1")
def test_logged_metrics_have_their_defined_values(tmp_path):
    """K=1, normalized, γ=0.1: one inner step of length exactly γ, ‖G‖ = 1; BoringModel's SGD (lr 0.1)
    then moves the weights by lr·‖G‖ = 0.1, so inner/outer = 1."""
    from lightning.pytorch.loggers import CSVLogger

    trainer = fit(
        make_boring(),
        boring_batches(n=3),
        K=1,
        callbacks=[NexusCallback(inner_lr=0.1)],
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
    )
    metrics = trainer.callback_metrics
    assert metrics["nexus/pseudo_grad_norm"].item() == pytest.approx(1.0, rel=1e-5)
    assert metrics["nexus/inner_displacement"].item() == pytest.approx(0.1, rel=1e-5)
    assert metrics["nexus/inner_to_outer_ratio"].item() == pytest.approx(1.0, rel=1e-4)
    assert metrics["nexus/skipped_windows"].item() == 0
    assert metrics["nexus/inner_lr"].item() == pytest.approx(0.1)


def test_inner_lr_follows_the_outer_schedule():
    class Decaying(BoringModel):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return [opt], [{"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s), "interval": "step"}]

    seen = []

    class _Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(cb.nexus.inner_lr)

    cb = NexusCallback(inner_lr=0.2, inner_lr_schedule="follow_outer")
    torch.manual_seed(0)
    fit(Decaying(), boring_batches(n=6), K=2, callbacks=[cb, _Spy()])
    assert seen[1::2] == pytest.approx([0.2, 0.1, 0.05])  # γ_t = γ·lr_t/lr_0, fixed within a window


def test_unfreezing_a_layer_mid_run_brings_it_under_nexus():
    """Layer frozen for the first window, trainable from the second: the reference treats it the same."""

    class TwoLayer(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(32, 8), torch.nn.Linear(8, 2)
            self.b.requires_grad_(False)

        def training_step(self, batch, batch_idx):
            return self.b(torch.tanh(self.a(batch))).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Unfreeze(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 4:
                pl_module.b.requires_grad_(True)

    torch.manual_seed(0)
    module = TwoLayer()
    reference = clone_module(module)
    batches = boring_batches(n=8)
    fit(module, batches, K=4, callbacks=[NexusCallback(inner_lr=0.2), Unfreeze()])

    # reference: window 1 with b frozen (only a moves), window 2 with everything
    opt = reference.configure_optimizers()
    for start in (0, 4):
        params = [
            p for p in reference.parameters() if start == 4 or p is not reference.b.weight and p is not reference.b.bias
        ]
        if start == 4:
            reference.b.requires_grad_(True)
        theta0 = [p.detach().clone() for p in params]
        ds = []
        for i in range(start, start + 4):
            reference.zero_grad(set_to_none=True)
            reference.training_step(batches[i], i).backward()
            g = [p.grad.detach().clone() for p in params]
            norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g)).float()
            ds.append([x / norm for x in g])
            with torch.no_grad():
                for p, d in zip(params, ds[-1]):
                    p.sub_(0.2 * d)
        with torch.no_grad():
            for j, p in enumerate(params):
                p.copy_(theta0[j])
                p.grad = sum(d[j] for d in ds) / len(ds)
        opt.step()
    assert_params_close(params_of(module), params_of(reference))


def test_window_mode_without_nexus_callback_is_refused():
    """sync='window' turns DDP's all-reduce off: without the callback nothing would ever sync the ranks."""
    from lightning_nexus import NexusDDPStrategy

    with pytest.raises(RuntimeError, match="without NexusCallback the ranks would never sync"):
        NexusDDPStrategy(sync="window").setup(SimpleNamespace(callbacks=[]))
