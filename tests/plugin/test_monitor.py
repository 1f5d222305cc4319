"""GradSimilarityMonitor against brute-force per-micro-batch gradients computed here, with and without
NexusCallback and in both callback orders; the sketch against exact; labels and config errors."""

from __future__ import annotations

import itertools
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from lightning_nexus import NexusCallback
from lightning_nexus.monitor import GradSimilarityMonitor

NAMES = ["alpha", "beta", "gamma"]
SOURCES = [0, 1, 0, 2]  # K=4 with a repeated source: alpha__alpha, alpha__beta twice, ...


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append(dict(metrics))


class Sourced(pl.LightningModule):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    def loss(self, batch):
        # each source has its own target map, so gradients of different sources genuinely disagree
        target = torch.sin(batch["x"].sum(1, keepdim=True) * (1.0 + batch["source_id"][:, None].float()))
        return torch.nn.functional.mse_loss(self.net(batch["x"]), target)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Data(pl.LightningDataModule):
    source_names = NAMES

    def __init__(self, n: int, sources=SOURCES, mixed: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.batches = []
        for i in range(n):
            sid = torch.full((4,), sources[i % len(sources)])
            if mixed:
                sid = torch.tensor([0, 1, 2, 0])
            self.batches.append({"x": torch.randn(4, 8, generator=gen), "source_id": sid})

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None)


class ParamsAtMicroBatch(pl.Callback):
    """Parameters each micro-batch's backward sees (NexusCallback moves them between micro-batches)."""

    def __init__(self) -> None:
        self.params: list[list[torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.params.append([p.detach().clone() for p in pl_module.parameters()])


def brute_force(module: Sourced, params: list[torch.Tensor], batch) -> torch.Tensor:
    """Flat gradient of the micro-batch's mean loss at ``params``, computed on a fresh copy."""
    twin = Sourced(hidden=module.net[0].out_features)
    with torch.no_grad():
        for p, q in zip(twin.parameters(), params):
            p.copy_(q)
    twin.loss(batch).backward()
    return torch.cat([p.grad.reshape(-1) for p in twin.parameters()]).double()


def run(callbacks, n=16, K=4, log_every=2, data=None, **kw):
    logger = MemoryLogger()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=K,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=log_every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )
    module = Sourced()
    data = data or Data(n)
    trainer.fit(module, datamodule=data)
    return module, data, [r for r in logger.records if "nexus/grad_cosine/mean" in r]


@pytest.mark.parametrize("nexus", ["none", "before", "after"])
def test_exact_cosines_and_norms_equal_brute_force(nexus):
    capture, monitor = ParamsAtMicroBatch(), GradSimilarityMonitor(mode="exact")
    callbacks = [capture, monitor]
    if nexus == "before":
        callbacks.insert(1, NexusCallback(inner_lr=0.1))
    elif nexus == "after":
        callbacks.append(NexusCallback(inner_lr=0.1))
    module, data, logged = run(callbacks)
    K, windows = 4, 4
    expected_windows = [w for w in range(windows) if (w + 1) % 2 == 0]  # log_every_n_steps=2
    assert len(logged) == len(expected_windows)
    for record, w in zip(logged, expected_windows):
        idx = range(w * K, (w + 1) * K)
        grads = [brute_force(module, capture.params[i], data.batches[i]) for i in idx]
        labels = [NAMES[SOURCES[i % len(SOURCES)]] for i in idx]
        pairs: dict[str, list[float]] = {}
        for a, b in itertools.combinations(range(K), 2):
            cos = float(grads[a] @ grads[b] / (grads[a].norm() * grads[b].norm()))
            pairs.setdefault("__".join(sorted((labels[a], labels[b]))), []).append(cos)
        assert set(pairs) == {"alpha__alpha", "alpha__beta", "alpha__gamma", "beta__gamma"}
        for name, values in pairs.items():
            assert record[f"nexus/grad_cosine/{name}"] == pytest.approx(sum(values) / len(values), abs=1e-5)
        mean = sum(sum(v) for v in pairs.values()) / math.comb(K, 2)
        assert record["nexus/grad_cosine/mean"] == pytest.approx(mean, abs=1e-5)
        for name in ("alpha", "beta", "gamma"):
            norms = [float(g.norm()) for g, label in zip(grads, labels) if label == name]
            assert record[f"nexus/grad_norm/{name}"] == pytest.approx(sum(norms) / len(norms), rel=1e-5)
    if nexus != "none":  # the inner steps really moved the parameters the monitor saw
        assert not torch.equal(capture.params[4][0], capture.params[5][0])


def test_sketch_within_0_05_of_exact_at_default_width():
    exact, sketch, auto = (GradSimilarityMonitor(mode=m) for m in ("exact", "sketch", "auto"))
    results = []

    class Grab(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if exact.last is not None and (not results or results[-1][0] is not exact.last):
                results.append((exact.last, sketch.last, auto.last))

    logger = MemoryLogger()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=4,
        log_every_n_steps=1,
        logger=logger,
        callbacks=[exact, sketch, auto, Grab(), NexusCallback()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = Sourced(hidden=2048)  # 20k parameters: many share each of the 16384 sketch buckets
    assert sum(p.numel() for p in module.parameters()) > 16384
    trainer.fit(module, datamodule=Data(12))
    assert len(results) == 3
    for e, s, a in results:
        off_diagonal = ~torch.eye(4, dtype=torch.bool)
        err = (e.cosine - s.cosine)[off_diagonal].abs().max().item()
        assert 0 < err < 0.05  # not identical (it is a sketch) but close
        assert torch.allclose(e.grad_norms, s.grad_norms, rtol=0.05)
        assert torch.equal(a.cosine, e.cosine)  # auto = exact for a model this small
        assert e.cosine[off_diagonal].abs().max() > 0.1  # the comparison is not between near-zero numbers


def test_only_logged_windows_register_hooks_and_values_reach_progress_bar():
    monitor = GradSimilarityMonitor()
    seen = []

    class Probe(pl.Callback):
        def on_after_backward(self, trainer, pl_module):
            seen.append((trainer.global_step, bool(monitor._handles)))

    module, data, logged = run([monitor, Probe()], n=24, log_every=3)
    assert {step for step, hooked in seen if hooked} == {2, 5}  # windows 3 and 6 of 6
    assert all(not hooked for step, hooked in seen if step not in (2, 5))
    assert len(logged) == 2
    assert "nexus/grad_cosine/mean" in module.trainer.progress_bar_metrics


def test_labels_without_source_id_and_for_mixed_batches():
    class Plain(Sourced):
        def training_step(self, batch, batch_idx):
            return self.net(batch).pow(2).mean()

    logger = MemoryLogger()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=3,
        log_every_n_steps=1,
        logger=logger,
        callbacks=[GradSimilarityMonitor()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Plain(), DataLoader([torch.randn(4, 8) for _ in range(3)], batch_size=None))
    tags = set().union(*logger.records)
    assert {"nexus/grad_cosine/mb0__mb1", "nexus/grad_cosine/mb0__mb2", "nexus/grad_cosine/mb1__mb2"} <= tags

    _, _, logged = run([GradSimilarityMonitor()], n=8, data=Data(8, mixed=True))
    assert {"nexus/grad_cosine/mixed__mixed", "nexus/grad_norm/mixed"} <= set(logged[0])


def test_bad_arguments_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="mode"):
        GradSimilarityMonitor(mode="fast")
    with pytest.raises(ValueError, match="multiple of Trainer\\(log_every_n_steps=2\\)"):
        run([GradSimilarityMonitor(every_n_steps=3)], n=8)
