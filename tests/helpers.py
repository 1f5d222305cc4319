"""Independent slow references and small Lightning fixtures shared by the tests.

The reference below re-implements the rule of docs/update_rule.md with a plain loop over the module's own
``training_step`` and optimizer; it shares no code with ``lightning_nexus``."""

from __future__ import annotations

import contextlib
import copy
import math

import lightning.pytorch as pl
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.demos.transformer import LightningTransformer
from torch.utils.data import DataLoader


def loss_of(output):
    return output["loss"] if isinstance(output, dict) else output


def _optimizer_and_params(module):
    opt = module.configure_optimizers()
    opt = opt[0][0] if isinstance(opt, tuple) else opt
    return opt, [p for group in opt.param_groups for p in group["params"]]


def _inner_directions(module, params, theta0, window, inner_lr, normalize):
    """From θ0, one inner step per (batch_idx, batch) of ``window``; the directions d_k taken."""
    with torch.no_grad():
        for p, t in zip(params, theta0):
            p.copy_(t)
    directions = []
    for batch_idx, batch in window:
        module.zero_grad(set_to_none=True)
        loss_of(module.training_step(batch, batch_idx)).backward()
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        if normalize:
            norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
            grads = [g / norm for g in grads]
        directions.append(grads)
        with torch.no_grad():
            for p, d in zip(params, grads):
                p.sub_(inner_lr * d)
    return directions


def reference_nexus_training(module, batches, K, inner_lr, normalize, clip_norm=None, skip_windows=()):
    """Train ``module`` in place with the Nexus rule, one epoch over ``batches``; return its parameters."""
    return reference_window_mode_training(module, batches, 1, K, inner_lr, normalize, clip_norm, skip_windows)


def reference_window_mode_training(
    module, batches, world, K, inner_lr, normalize=True, clip_norm=None, skip_windows=()
):
    """The rule with ``world`` ranks in window mode (DiLoCo-like): rank r takes ``batches[r::world]``, every
    rank runs its own inner trajectory from the shared θ0, and the outer step gets the mean over ranks of
    each rank's mean direction. ``world=1`` is the single-process rule. Returns the parameters."""
    opt, params = _optimizer_and_params(module)
    per_rank = [list(enumerate(batches))[r::world] for r in range(world)]
    for w, start in enumerate(range(0, len(per_rank[0]), K)):
        theta0 = [p.detach().clone() for p in params]
        rank_g = []
        for r in range(world):
            directions = _inner_directions(module, params, theta0, per_rank[r][start : start + K], inner_lr, normalize)
            rank_g.append([sum(d[i] for d in directions) / len(directions) for i in range(len(params))])
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(theta0[i])
                p.grad = sum(g[i] for g in rank_g) / world
        if w in skip_windows:
            continue
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        opt.step()
    return [p.detach().clone() for p in params]


def boring_batches(n=10, batch_size=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, 32, generator=gen) for _ in range(n)]


def transformer_batches(n=8, batch_size=2, seq=6, vocab=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (batch_size, seq + 1), generator=gen)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def make_boring(seed=0):
    torch.manual_seed(seed)
    return BoringModel()


class LocalTransformer(LightningTransformer):
    """Lightning's demo transformer without its WikiText2 download (the tests feed random tokens)."""

    def prepare_data(self) -> None:
        pass


def make_mlp(seed=0):
    """A small MLP whose layers shard evenly over 2 ranks (FSDP2 tests)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))


def shard_mlp(net, mesh):
    """FSDP2 over a Sequential's Linear layers, then the root: what the FSDP2 workers' configure_model does."""
    from torch.distributed.fsdp import fully_shard

    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)


class MLPModule(pl.LightningModule):
    """The unsharded twin of the FSDP2 worker's module, for references."""

    def __init__(self, seed=0):
        super().__init__()
        self.net = make_mlp(seed)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.net(batch), torch.ones(batch.shape[0], 2))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)  # stateful: resume restores it


def make_transformer(seed=0, vocab=40):
    torch.manual_seed(seed)
    module = LocalTransformer(vocab_size=vocab)
    for m in module.modules():  # dropout would make the two runs draw different masks
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(m, torch.nn.MultiheadAttention):
            m.dropout = 0.0
    return module


def fit(module, batches, K, callbacks=(), max_epochs=1, **trainer_kwargs):
    trainer_kwargs.setdefault("logger", False)
    trainer_kwargs.setdefault("enable_checkpointing", False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        accumulate_grad_batches=K,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return trainer


def params_of(module):
    return [p.detach().clone() for p in module.parameters()]


def assert_params_close(got, want, rtol=1e-5, atol=1e-7):
    """Per tensor, ‖got − want‖ ≤ rtol·‖want‖ + atol·√n: relative agreement of whole tensors, robust to
    fp32 rounding in elements that happen to be near zero. rtol=atol=0 demands bit equality."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"tensor {i}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        err = (g.double() - w.double()).norm().item()
        bound = rtol * w.double().norm().item() + atol * w.numel() ** 0.5
        assert err <= bound, f"tensor {i}: ‖Δ‖={err:.3e} > {bound:.3e} (‖want‖={w.double().norm().item():.3e})"


def clone_module(module):
    return copy.deepcopy(module)


_HOST_SYNC_METHODS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_host_syncs(monkeypatch):
    """Counts calls of the Tensor methods that copy a value to the host (a device→host sync on a GPU)
    while the context is open; yields a list whose length is the count (the method names, in order)."""
    calls: list[str] = []
    for name in _HOST_SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            if recording:
                calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    recording = True
    try:
        yield calls
    finally:
        recording = False
