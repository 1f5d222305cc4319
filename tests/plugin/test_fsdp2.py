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


def run_fsdp2(tmp_path, phase="full", checkpoint="sharded"):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": str(30500 + os.getpid() % 1000)}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests/plugin/fsdp2_worker.py"),
            str(tmp_path),
            "0.1",
            "3",
            "12",
            phase,
            checkpoint,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(tmp_path / f"{phase}_rank{r}.pt") for r in range(2)]


def test_fsdp2_equals_single_process_on_the_global_micro_batch(tmp_path):
    rank0, rank1 = (r["params"] for r in run_fsdp2(tmp_path))
    assert_params_close(rank0, rank1, rtol=0, atol=0)
    # sharded params + global norm across shards == DDP "every" == one process on the global micro-batch
    batches = boring_batches(n=12)
    global_batches = [torch.cat([batches[2 * i], batches[2 * i + 1]]) for i in range(6)]
    want = reference_nexus_training(MLPModule(), global_batches, K=3, inner_lr=0.1, normalize=True)
    assert_params_close(rank0, want)


@pytest.mark.parametrize("checkpoint", ["sharded", "full"])
def test_fsdp2_mid_window_checkpoint_stores_anchor_and_resumes(tmp_path, checkpoint):
    run_fsdp2(tmp_path, phase="save", checkpoint=checkpoint)
    anchor = torch.load(tmp_path / "anchor.pt")
    names = [name for name, _ in MLPModule().named_parameters()]
    if checkpoint == "full":
        saved = torch.load(tmp_path / "mid.ckpt", weights_only=False)["state_dict"]
    else:  # a torch.distributed.checkpoint directory: convert it to read the weights in one process
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(tmp_path / "mid.ckpt", tmp_path / "mid_full.pt")
        saved = torch.load(tmp_path / "mid_full.pt", weights_only=False)["state_dict"]
    assert_params_close([saved[n] for n in names], anchor, rtol=0, atol=0)  # θ0 of the window, not θ_2

    resumed = run_fsdp2(tmp_path, phase="resume", checkpoint=checkpoint)
    assert_params_close(resumed[0]["params"], resumed[1]["params"], rtol=0, atol=0)
    assert resumed[0]["global_step"] == resumed[1]["global_step"] == 2
    assert all(torch.isfinite(p).all() for p in resumed[0]["params"])
