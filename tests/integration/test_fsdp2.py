"""NexusCallback under FSDP2 (Lightning's ModelParallelStrategy) with 2 CPU processes (gloo)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import MLPModule, assert_params_close, boring_batches, reference_nexus_training

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_fsdp2_equals_single_process_on_the_global_micro_batch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": str(30500 + os.getpid() % 1000)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests/integration/fsdp2_worker.py"), str(tmp_path), "0.1", "3", "12"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert_params_close(rank0, rank1, rtol=0, atol=0)
    # sharded params + global norm across shards == DDP "every" == one process on the global micro-batch
    batches = boring_batches(n=12)
    global_batches = [torch.cat([batches[2 * i], batches[2 * i + 1]]) for i in range(6)]
    want = reference_nexus_training(MLPModule(), global_batches, K=3, inner_lr=0.1, normalize=True)
    assert_params_close(rank0, want)
