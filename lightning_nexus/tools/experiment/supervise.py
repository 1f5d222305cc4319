"""Run a command as the leader of its own process group and take the whole group down with the runner.

``python -m lightning_nexus.tools.experiment.supervise PARENT_PID -- CMD...`` is how the experiment runner
starts each ``lightning-nexus fit``. The supervisor is a process-group leader (the runner starts it with
``start_new_session``), so the fit and everything it spawns (DDP ranks, data-loader workers) share its group.
It stops that group when

* it receives SIGTERM or SIGINT (the runner forwards its own), or
* the runner dies, even by SIGKILL: on Linux the kernel sends it SIGTERM (``PR_SET_DEATHSIG``); elsewhere,
  and as a backstop, it notices that its parent changed within half a second.

Stopping means SIGTERM to the group, then SIGKILL to whatever is left after ``GRACE_S``. The parent-death
signal is set here, in the supervisor itself, rather than in a ``preexec_fn``: the runner starts children
from worker threads, where ``preexec_fn`` is unsafe, and the supervisor also reaches the grandchildren, which
a death signal on the fit process alone would not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
from typing import NoReturn

GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies; False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def stop_group(child: subprocess.Popen, grace_s: float = GRACE_S) -> NoReturn:
    """SIGTERM this process group, wait up to ``grace_s`` for the command, SIGKILL the group (and exit)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group signal reaches this process too
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    group = os.getpgrp()
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        child.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    os.killpg(group, signal.SIGKILL)  # also ends this process: nothing of the group is left behind
    raise SystemExit(128 + signal.SIGKILL)  # pragma: no cover  (not reached)


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: python -m lightning_nexus.tools.experiment.supervise PARENT_PID -- CMD...")
    parent = int(argv[0])
    set_parent_death_signal(signal.SIGTERM)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    if os.getppid() != parent:  # the runner died before the death signal was set
        raise SystemExit(128 + signal.SIGTERM)
    child = subprocess.Popen(argv[2:])  # same process group as this supervisor
    while True:
        if stopping or os.getppid() != parent:
            stop_group(child)
        try:
            code = child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            continue
        raise SystemExit(code if code >= 0 else 128 - code)  # killed by signal N: the shell's 128 + N


if __name__ == "__main__":
    main(sys.argv[1:])
