"""A killed corpus build leaves nothing the next build keeps, and the fix a damage error names works."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_nexus.data import CorruptCacheError, build_embedded_corpus

ROOT = Path(__file__).resolve().parents[2]
SMALL = 30_000

_BLOCKED_BUILD = """
import sys, time
import lightning_nexus.data.corpus as c
real, calls = c.write_token_dir, []
def blocking(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # one source written into the temp dir, then stuck until SIGKILLed
        open(sys.argv[2], "w").close()
        time.sleep(300)
    return real(*args, **kwargs)
c.write_token_dir = blocking
c.build_embedded_corpus(sys.argv[1], max_bytes_per_source=int(sys.argv[3]), verbose=False)
"""


def test_temp_dir_of_a_sigkilled_build_is_removed_by_the_next_build(tmp_path):
    cache, blocked = tmp_path / "cache", tmp_path / "blocked"
    proc = subprocess.Popen(
        [sys.executable, "-c", _BLOCKED_BUILD, str(cache), str(blocked), str(SMALL)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not blocked.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [p for p in cache.iterdir() if ".tmp-" in p.name]
    assert leftovers, "the killed build should have left its temporary directory"
    corpus = build_embedded_corpus(cache, max_bytes_per_source=SMALL, verbose=False)
    assert len(corpus.sources) >= 5
    assert [p for p in cache.iterdir() if ".tmp-" in p.name] == []


def test_the_fix_named_for_chunk_damage_works_on_its_own(tmp_path):
    corpus = build_embedded_corpus(tmp_path, max_bytes_per_source=SMALL, verbose=False)
    chunk = next((corpus.root / "code" / "data").glob("chunk-*.bin"))
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError) as err:
        build_embedded_corpus(tmp_path, max_bytes_per_source=SMALL, verbose=False)
    named = Path(re.search(r"delete (\S+) and run again", str(err.value)).group(1))
    assert named == corpus.root  # the whole corpus: its manifest covers every source dir
    shutil.rmtree(named)  # exactly what the message says, nothing more
    assert len(build_embedded_corpus(tmp_path, max_bytes_per_source=SMALL, verbose=False).sources) >= 5
