"""Checkpoint files that are verified: written atomically, refused when damaged or non-finite, with a fallback.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction, which for local files stages the
bytes in the *system* temp dir and then moves them: across filesystems the move is a copy, so a full disk
leaves a truncated file at the final path, and nothing is fsynced. Its load errors come straight from
``torch.load`` ("PytorchStreamReader failed reading zip archive", a bare ``EOFError``) without the file's
name, and it loads NaN weights silently. :class:`VerifiedCheckpointIO` keeps everything else of it (remote
filesystems still go through Lightning) and adds:

* local writes go to a temporary file in the checkpoint's own directory, are fsynced and renamed into
  place, so a final path only ever holds a complete checkpoint; leftovers of a killed writer are removed
  by the next save into that directory;
* every load error names the file and says what to do; a checkpoint whose weights hold NaN/Inf is refused;
* a ``last*.ckpt`` that cannot be used (what ``ckpt_path="last"`` resolves to) falls back to the newest
  checkpoint in the same directory that loads, with a warning naming both files and the reason.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_nexus._writers import host_tag, writer_alive
from lightning_nexus.core import DTensor

_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.partial$")


class CheckpointLoadError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file."""


class VerifiedCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic local writes, load errors that name the file, refusal of non-finite
    weights, and a fallback from a damaged ``last.ckpt`` to the newest checkpoint that loads.

    ``lightning-nexus fit`` and the recipes use it by default; with a plain ``Trainer`` pass it as a plugin.

    Args:
        fallback_from_last: when a ``last*.ckpt`` cannot be loaded (damaged, truncated, non-finite), resume
            from the newest other ``*.ckpt`` in its directory that loads, and warn which one and why. Any
            other path that cannot be loaded raises :class:`CheckpointLoadError`.
        allow_non_finite: substrings of state-dict keys that may legitimately hold ±Inf (e.g. causal
            attention masks stored as buffers); NaN is refused everywhere.

    Example::

        import tempfile
        from lightning.pytorch import Trainer
        from lightning.pytorch.demos.boring_classes import BoringModel
        from lightning_nexus.checkpoint import VerifiedCheckpointIO

        trainer = Trainer(max_steps=2, default_root_dir=tempfile.mkdtemp(), plugins=[VerifiedCheckpointIO()],
                          logger=False, enable_progress_bar=False)
        trainer.fit(BoringModel())
    """

    def __init__(self, fallback_from_last: bool = True, allow_non_finite: Sequence[str] = ("mask",)) -> None:
        super().__init__()
        self.fallback_from_last = fallback_from_last
        self.allow_non_finite = tuple(allow_non_finite)

    # ------------------------------------------------------------------ writing
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)  # object stores write whole objects
            return
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint(storage_options=...) is not supported for local files."
            )
        atomic_torch_save(checkpoint, Path(path))

    # ------------------------------------------------------------------ reading
    @override
    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        try:
            return self._load_verified(path, map_location, weights_only)
        except CheckpointLoadError as err:
            if not (self.fallback_from_last and Path(str(path)).name.startswith("last")):
                raise
            return self._load_fallback(Path(str(path)), err, map_location, weights_only)

    def _load_verified(self, path: _PATH, map_location: Any, weights_only: bool | None) -> dict[str, Any]:
        if not get_filesystem(path).exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as err:  # torch.load raises anything from EOFError to RuntimeError for damage
            raise CheckpointLoadError(
                f"Cannot load checkpoint {path}: {type(err).__name__}: {err}. The file is truncated or damaged "
                "(an interrupted copy or a full disk; files written by VerifiedCheckpointIO are never partial). "
                "Resume from another checkpoint of this run, or with ckpt_path='last' to use the newest that loads."
            ) from err
        bad = non_finite_entries(checkpoint.get("state_dict", {}), self.allow_non_finite)
        if bad:
            listed = ", ".join(f"{k} ({n} values)" for k, n in bad[:5]) + (
                f" and {len(bad) - 5} more tensors" if len(bad) > 5 else ""
            )
            raise CheckpointLoadError(
                f"Refusing checkpoint {path}: its weights contain NaN/Inf in {listed}. Training from it would "
                "skip every window. It was written after the run diverged, or the file is damaged: resume from an "
                "earlier checkpoint."
            )
        return checkpoint

    def _load_fallback(
        self, path: Path, err: CheckpointLoadError, map_location: Any, weights_only: bool | None
    ) -> dict[str, Any]:
        candidates = sorted(
            (p for p in path.parent.glob("*.ckpt") if p.is_file() and p.resolve() != path.resolve()),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        rejected = [f"{path.name}: {err}"]
        for candidate in candidates:
            try:
                checkpoint = self._load_verified(candidate, map_location, weights_only)
            except CheckpointLoadError as other:
                rejected.append(f"{candidate.name}: {other}")
                continue
            rank_zero_warn(
                f"Checkpoint {path} cannot be used ({err}). Resuming from {candidate} instead: the newest "
                f"checkpoint in {path.parent} that loads"
                + (f" (also rejected: {', '.join(r.split(':')[0] for r in rejected[1:])})" if rejected[1:] else "")
                + "."
            )
            return checkpoint
        raise CheckpointLoadError(
            f"No checkpoint in {path.parent} can be loaded, so the run cannot resume:\n  " + "\n  ".join(rejected)
        ) from err


def non_finite_entries(state_dict: dict[str, Any], allow_inf: Sequence[str] = ()) -> list[tuple[str, int]]:
    """``(key, count)`` of the floating tensors in ``state_dict`` holding NaN (or ±Inf, unless the key contains
    one of ``allow_inf``)."""
    bad = []
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        if DTensor is not None and isinstance(value, DTensor):  # check what this process holds
            value = value.to_local()
        wrong = torch.isnan(value) if any(s in key for s in allow_inf) else ~torch.isfinite(value)
        count = int(wrong.sum())
        if count:
            bad.append((key, count))
    return bad


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, rename: ``path`` is complete or untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path.parent)
    tmp = path.parent / f".{path.name}.{host_tag()}.{os.getpid()}.partial"
    try:
        with open(tmp, "wb") as f:
            _write(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        cause = _os_error_in_chain(err)  # torch's zip writer turns a failed write into a RuntimeError
        if cause is None:
            raise
        full = " (the disk is full)" if cause.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise OSError(
            cause.errno,
            f"Could not write checkpoint {path}{full}: {cause.strerror or cause}. Nothing was left at that path; "
            "an older file there is intact. Free space or point the checkpoint directory elsewhere.",
        ) from err
    _fsync_dir(path.parent)


def _os_error_in_chain(err: BaseException | None) -> OSError | None:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _write(obj: Any, f: Any) -> None:  # a seam for tests that fill the disk
    torch.save(obj, f)


def remove_stale_partials(directory: Path) -> list[Path]:
    """Delete temporary checkpoint files of writers on this host that no longer run (killed mid-write)."""
    removed = []
    for p in directory.glob(".*.partial"):
        m = _PARTIAL.match(p.name)
        if m is None or m["host"] != host_tag() or writer_alive(int(m["pid"])):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on every platform / filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
