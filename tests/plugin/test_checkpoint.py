"""VerifiedCheckpointIO: damaged checkpoints are named and refused, ``last`` falls back, writes are atomic."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_nexus import NexusCallback
from lightning_nexus import checkpoint as ckpt_module
from lightning_nexus._writers import host_tag
from lightning_nexus.checkpoint import CheckpointLoadError, VerifiedCheckpointIO, atomic_torch_save

ROOT = Path(__file__).resolve().parents[2]


def _trainer(tmp_path, callbacks=(), **kw):
    kw.setdefault("max_steps", 4)
    return Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        accumulate_grad_batches=2,
        callbacks=[NexusCallback(), *callbacks],
        plugins=[VerifiedCheckpointIO()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **kw,
    )


@pytest.fixture
def good_checkpoint(tmp_path) -> Path:
    trainer = _trainer(tmp_path)
    trainer.fit(BoringModel())
    path = tmp_path / "good.ckpt"
    trainer.save_checkpoint(path)
    return path


def _resume(tmp_path, ckpt_path, **kw):
    trainer = _trainer(tmp_path / "resume", max_steps=6, **kw)
    trainer.fit(BoringModel(), ckpt_path=ckpt_path)
    return trainer


def test_truncated_checkpoint_error_names_the_file(tmp_path, good_checkpoint):
    bad = tmp_path / "step10.ckpt"
    bad.write_bytes(good_checkpoint.read_bytes()[:2000])
    with pytest.raises(CheckpointLoadError, match=rf"Cannot load checkpoint {bad}: .*truncated or damaged"):
        _resume(tmp_path, bad)


def test_zero_byte_checkpoint_error_names_the_file(tmp_path):
    bad = tmp_path / "empty.ckpt"
    bad.touch()
    with pytest.raises(CheckpointLoadError, match=rf"Cannot load checkpoint {bad}: EOFError"):
        _resume(tmp_path, bad)


def _overwrite_largest_tensor(path: Path, byte: bytes = b"\xff") -> None:
    """Garbage over the stored bytes of the largest tensor (0xFF... reads back as NaN in float32)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        f.write(byte * info.file_size)


def test_checkpoint_with_garbage_inside_is_refused(tmp_path, good_checkpoint):
    bad = tmp_path / "garbage.ckpt"
    shutil.copy(good_checkpoint, bad)
    _overwrite_largest_tensor(bad)
    with pytest.raises(CheckpointLoadError, match=rf"Refusing checkpoint {bad}: its weights contain NaN/Inf in"):
        _resume(tmp_path, bad)


def test_non_finite_weights_refused_but_inf_masks_allowed(tmp_path):
    io = VerifiedCheckpointIO()
    state = {"layer.weight": torch.ones(3), "attn.mask": torch.tensor([0.0, float("-inf")])}
    atomic_torch_save({"state_dict": state}, tmp_path / "ok.ckpt")
    assert io.load_checkpoint(tmp_path / "ok.ckpt")["state_dict"]["attn.mask"][1] == float("-inf")
    state["layer.weight"][1] = float("nan")
    atomic_torch_save({"state_dict": state}, tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointLoadError, match=r"layer.weight \(1 values\)"):
        io.load_checkpoint(tmp_path / "nan.ckpt")


def test_ckpt_path_last_falls_back_to_newest_checkpoint_that_loads(tmp_path):
    ckpt_dir = tmp_path / "ckpts"
    every = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1, save_last=True)
    _trainer(tmp_path, callbacks=[every]).fit(BoringModel())
    last = ckpt_dir / "last.ckpt"
    assert last.exists() and (ckpt_dir / "epoch=0-step=4.ckpt").exists()
    _overwrite_largest_tensor(ckpt_dir / "epoch=0-step=4.ckpt")  # the newest numbered one holds NaN weights
    last.write_bytes(last.read_bytes()[:1000])  # and last.ckpt is truncated (a copy that did not finish)
    resumed = ModelCheckpoint(dirpath=ckpt_dir, save_last=True)
    with pytest.warns(
        UserWarning,
        match=r"last.ckpt cannot be used .*Resuming from .*step=3.ckpt instead.*also rejected: epoch=0-step=4.ckpt",
    ):
        trainer = _resume(tmp_path, "last", callbacks=[resumed])
    assert trainer.global_step == 6  # resumed at step 3, trained 3 more


def test_no_partial_file_at_final_path_on_full_disk(tmp_path, good_checkpoint, monkeypatch):
    """An injected ENOSPC halfway through the write: the old file at the final path survives intact."""
    final = tmp_path / "last.ckpt"
    shutil.copy(good_checkpoint, final)
    before = final.read_bytes()

    def fill_disk(obj, f):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    trainer = _trainer(tmp_path)
    trainer.fit(BoringModel())
    monkeypatch.setattr(ckpt_module, "_write", fill_disk)
    with pytest.raises(OSError, match=rf"Could not write checkpoint {final} \(the disk is full\)"):
        trainer.save_checkpoint(final)
    assert final.read_bytes() == before
    assert not list(tmp_path.glob(".*.partial"))


def test_real_full_filesystem_leaves_nothing_at_the_final_path(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root); the injected-ENOSPC test covers it")
    try:
        with pytest.raises(OSError, match="disk is full"):
            atomic_torch_save({"state_dict": {"w": torch.zeros(200_000)}}, mnt / "step10.ckpt")
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


_WRITER = """
import sys, torch
from pathlib import Path
from lightning_nexus.checkpoint import atomic_torch_save
out = Path(sys.argv[1])
for i in range(10_000):
    atomic_torch_save({"state_dict": {"w": torch.full((500_000,), float(i))}}, out / f"step{i % 3}.ckpt")
    (out / "progress").write_text(str(i))
"""


def test_sigkill_during_writes_never_leaves_a_partial_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not ((tmp_path / "progress").exists() and int((tmp_path / "progress").read_text() or 0) >= 3):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    io = VerifiedCheckpointIO(fallback_from_last=False)
    finals = sorted(tmp_path.glob("step*.ckpt"))
    assert finals
    for path in finals:  # every file at a final path is complete
        assert io.load_checkpoint(path)["state_dict"]["w"].shape == (500_000,)
    # a writer killed mid-write leaves its temporary file; the next save into the directory removes it
    (tmp_path / f".step9.ckpt.{host_tag()}.{proc.pid}.partial").write_bytes(b"half")
    atomic_torch_save({"state_dict": {}}, tmp_path / "next.ckpt")
    assert not list(tmp_path.glob(".*.partial"))
