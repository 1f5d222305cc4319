"""Who wrote a temporary file: the host tag and pid in its name, and whether that writer still runs.

Checkpoint writes and corpus builds name their temporaries after the writing process, so a later run can
remove the leftovers of a killed writer without touching those of one that is still at work.
"""

from __future__ import annotations

import os
import re
import socket


def host_tag() -> str:
    """This host's name with every character but letters, digits and ``_`` replaced: safe inside names
    whose parts are separated by ``.`` or ``-``."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())


def writer_alive(pid: int) -> bool:
    """Whether process ``pid`` on this host still runs (this process counts: another thread may be writing)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
