"""Exact resume from any checkpoint, including one Lightning writes mid-window.

A run is SIGKILLed at a chosen batch (a real kill of its process group) after Lightning wrote ``last.ckpt``
at a validation inside a window, resumed with ``ckpt_path=last.ckpt``, and compared with the uninterrupted
run: the same batches, the same weights and the same optimizer state, to max|Δθ| ≤ 1e-6.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader

from lightning_nexus import NexusCallback
from tests.helpers import make_boring
from tests.plugin.resume_worker import BATCHES_PER_EPOCH, EPOCHS, K

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests/plugin/resume_worker.py"


def _env(port_offset: int) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "MASTER_PORT": str(31500 + port_offset + os.getpid() % 500),
    }


def _run(out: Path, mode: str, phase: str, at: int = 0, inner_lr: float = 0.1) -> None:
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out), mode, phase, str(at), str(inner_lr)],
        cwd=out,
        env=_env(0 if phase == "full" else 7),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def _run_and_kill(out: Path, mode: str, kill_at: int, inner_lr: float) -> None:
    """Start the worker in its own process group and SIGKILL the whole group once every rank is blocked."""
    world = 1 if mode == "single" else 2
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(out), mode, "kill", str(kill_at), str(inner_lr)],
        cwd=out,
        env=_env(3),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not all((out / f"blocked{r}").exists() for r in range(world)):
            if proc.poll() is not None:
                raise AssertionError(f"worker exited early: {proc.stderr.read().decode()[-4000:]}")
            assert time.monotonic() < deadline, "worker never reached the kill point"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _seen(out: Path, phase: str, rank: int) -> list[int]:
    return [int(line) for line in (out / f"{phase}_seen{rank}.txt").read_text().split()]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x.detach().double() - y.detach().double()).abs().max()) for x, y in zip(a, b))


def _checkpoint_position(path: Path) -> tuple[int, int]:
    """(micro-batches done, position inside the window) of a Lightning checkpoint file."""
    ckpt = torch.load(path, weights_only=False)
    done = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
    (nexus_state,) = (v for k, v in ckpt["callbacks"].items() if k.startswith("NexusCallback"))
    return done, nexus_state["window_position"]


def check_resume(tmp_path: Path, mode: str, at: int, inner_lr: float = 0.1, kill: bool = False) -> float:
    """Uninterrupted run vs a run resumed from ``last.ckpt`` as it was before global batch ``at`` (after a
    real SIGKILL there with ``kill``); returns max|Δθ| over the ranks."""
    world = 1 if mode == "single" else 2
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_dir.mkdir()
    if kill:
        _run(full_dir, mode, "full", at, inner_lr)
        cut_dir.mkdir()
        _run_and_kill(cut_dir, mode, at, inner_lr)
        saved_after, position = _checkpoint_position(cut_dir / "ckpt" / "last.ckpt")  # before resume replaces it
        _run(cut_dir, mode, "resume", inner_lr=inner_lr)
    else:
        cut_dir = full_dir
        _run(full_dir, mode, "full+resume", at, inner_lr)
        saved_after, position = _checkpoint_position(full_dir / "snapshot.ckpt")
    assert position == saved_after % K != 0, "the checkpoint must be mid-window for this test"
    worst = 0.0
    results = []
    for r in range(world):
        full, resumed = (torch.load(d / f"{p}_rank{r}.pt") for d, p in ((full_dir, "full"), (cut_dir, "resume")))
        results.append(resumed)
        full_seen, resumed_seen = _seen(full_dir, "full", r), _seen(cut_dir, "resume", r)
        assert len(full_seen) == BATCHES_PER_EPOCH * EPOCHS
        assert resumed_seen == full_seen[saved_after:]  # no micro-batch lost or repeated
        assert resumed["global_step"] == full["global_step"] == BATCHES_PER_EPOCH * EPOCHS // K
        assert resumed["skipped_windows"] == 0 and resumed["completed_windows"] == full["completed_windows"]
        worst = max(worst, max_abs_diff(resumed["params"], full["params"]))
        assert max_abs_diff(resumed["opt_state"], full["opt_state"]) <= 1e-6
    assert worst <= 1e-6, f"{mode}: max|Δθ| = {worst:.3e}"
    for other in results[1:]:  # ranks agree
        assert max_abs_diff(other["params"], results[0]["params"]) == 0.0
    print(f"{mode} resumed after micro-batch {position} of a window: max|dtheta| = {worst:.3e}")
    return worst


@pytest.mark.slow
def test_sigkill_and_resume_from_mid_window_checkpoint_is_exact(tmp_path):
    # SIGKILL before batch 6: last.ckpt is from the validation after micro-batch 5 (window 2, position 2)
    check_resume(tmp_path, "single", at=6, kill=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "at", "inner_lr"),
    [("ddp_every", 11, 0.1), ("ddp_window", 6, 0.1), ("fsdp2", 18, 0.1)],
)
def test_resume_from_mid_window_checkpoint_is_exact_multi_process(tmp_path, mode, at, inner_lr):
    # at 6 / 11 / 18: last.ckpt from after micro-batch 5 / 10 / 17, window position 2 / 1 / 2 (18: epoch 2)
    check_resume(tmp_path, mode, at, inner_lr)


# ---------------------------------------------------------------- fast, in one process


class _Resumable:
    def __init__(self, batches):
        self.batches, self._start, self._position = batches, 0, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        start, self._start = self._start, 0
        for i in range(start, len(self.batches)):
            self._position = i + 1
            yield self.batches[i]

    def state_dict(self):
        return {"position": self._position}

    def load_state_dict(self, state):
        self._start = state["position"]


class _SaveAt(Callback):
    def __init__(self, path, at):
        self.path, self.at = path, at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            trainer.save_checkpoint(self.path)


def _fit(module, loader, callbacks, ckpt_path=None, **kw):
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=K,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **kw,
    )
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer


def _boring_batches(n=12):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 32, generator=gen) for _ in range(n)]


@pytest.mark.parametrize(("at", "inner_lr"), [(at, 0.1) for at in range(11)] + [(3, 0.0), (4, 0.0)])
def test_resume_from_every_micro_batch_is_exact(tmp_path, at, inner_lr):
    """A checkpoint after every micro-batch of the run (BoringModel, SGD + StepLR), in one process; with
    inner_lr 0 the window's state is the direction sum, not an inner point."""
    full = make_boring()
    _fit(full, _Resumable(_boring_batches()), [NexusCallback(inner_lr=inner_lr)])
    path = tmp_path / "at.ckpt"
    _fit(make_boring(), _Resumable(_boring_batches()), [NexusCallback(inner_lr=inner_lr), _SaveAt(path, at)])
    resumed = make_boring()
    _fit(resumed, _Resumable(_boring_batches()), [NexusCallback(inner_lr=inner_lr)], ckpt_path=path)
    assert max_abs_diff(list(resumed.parameters()), list(full.parameters())) <= 1e-6


class _Poisoned(LightningModule):
    """A linear model whose loss is NaN on the chosen micro-batches."""

    def __init__(self, nan_at=()):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(32, 2)
        self.nan_at = set(nan_at)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        return loss * float("nan") if batch_idx in self.nan_at else loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_resume_into_an_abandoned_window_still_skips_it(tmp_path):
    """Micro-batch 3 (window 2, position 1) is NaN; the checkpoint after micro-batch 4 is inside the abandoned
    window: the resumed run must skip that window too, not step on the remaining micro-batches alone."""
    full = _Poisoned(nan_at={3})
    nexus = NexusCallback(inner_lr=0.1)
    _fit(full, _Resumable(_boring_batches()), [nexus])
    assert nexus.skipped_windows == 1
    path = tmp_path / "abandoned.ckpt"
    _fit(_Poisoned(nan_at={3}), _Resumable(_boring_batches()), [NexusCallback(inner_lr=0.1), _SaveAt(path, 4)])
    resumed, nexus = _Poisoned(nan_at={3}), NexusCallback(inner_lr=0.1)
    _fit(resumed, _Resumable(_boring_batches()), [nexus], ckpt_path=path)
    assert nexus.skipped_windows == 1
    assert max_abs_diff(list(resumed.parameters()), list(full.parameters())) <= 1e-6


def test_non_resumable_loader_warns_what_is_lost(tmp_path):
    path = tmp_path / "mid.ckpt"
    _fit(make_boring(), DataLoader(_boring_batches(), batch_size=None), [NexusCallback(), _SaveAt(path, 4)])
    with pytest.warns(UserWarning, match=r"batches 0-6 of the restarted loader instead of batches 5-11"):
        _fit(make_boring(), DataLoader(_boring_batches(), batch_size=None), [NexusCallback()], ckpt_path=path)
