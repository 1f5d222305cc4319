"""NexusDDPStrategy with 2 CPU processes (gloo): ranks agree, and each mode equals its reference."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    assert_params_close,
    boring_batches,
    make_boring,
    reference_nexus_training,
    reference_window_mode_training,
)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_ddp(
    tmp_path, sync="every", strategy="nexus", inner_lr=0.1, K=3, n=12, phase="full", model="boring", precision="32"
):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    args = [str(tmp_path), sync, strategy, str(inner_lr), str(K), str(n), phase, model, precision]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests/plugin/ddp_worker.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    return proc


def load_ranks(tmp_path, phase="full"):
    return [torch.load(tmp_path / f"{phase}_rank{r}.pt")["params"] for r in range(2)]


def test_sync_every_equals_single_process_on_the_global_micro_batch(tmp_path):
    proc = run_ddp(tmp_path, sync="every")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = load_ranks(tmp_path)
    assert_params_close(rank0, rank1, rtol=0, atol=0)  # bit-identical across ranks
    batches = boring_batches(n=12)
    global_batches = [torch.cat([batches[2 * i], batches[2 * i + 1]]) for i in range(6)]
    want = reference_nexus_training(make_boring(), global_batches, K=3, inner_lr=0.1, normalize=True)
    assert_params_close(rank0, want)


def test_sync_window_ranks_agree_and_match_reference(tmp_path):
    proc = run_ddp(tmp_path, sync="window")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = load_ranks(tmp_path)
    assert_params_close(rank0, rank1, rtol=0, atol=0)
    want = reference_window_mode_training(make_boring(), boring_batches(n=12), world=2, K=3, inner_lr=0.1)
    assert_params_close(rank0, want)
    # and it is genuinely a different rule from sync="every"
    every = reference_nexus_training(
        make_boring(),
        [torch.cat([b0, b1]) for b0, b1 in zip(boring_batches(12)[0::2], boring_batches(12)[1::2])],
        K=3,
        inner_lr=0.1,
        normalize=True,
    )
    assert not torch.allclose(rank0[0], every[0])


def test_plain_ddp_with_two_processes_is_refused(tmp_path):
    proc = run_ddp(tmp_path, strategy="ddp")
    assert proc.returncode != 0
    assert "strategy='nexus_ddp'" in proc.stderr


def test_resume_from_mid_window_checkpoint(tmp_path):
    proc = run_ddp(tmp_path, sync="every", phase="save")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    anchor = torch.load(tmp_path / "anchor0.pt")
    saved = [ckpt["state_dict"][name] for name, _ in make_boring().named_parameters()]
    assert_params_close(saved, anchor, rtol=0, atol=0)  # the window's θ0, not the inner trajectory
    assert ckpt["global_step"] == 1

    proc = run_ddp(tmp_path, sync="every", phase="resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = [torch.load(tmp_path / f"resume_rank{r}.pt") for r in range(2)]
    assert_params_close(resumed[0]["params"], resumed[1]["params"], rtol=0, atol=0)
    assert resumed[0]["global_step"] == resumed[1]["global_step"] == 2
    assert all(torch.isfinite(p).all() for p in resumed[0]["params"])


@pytest.mark.parametrize("sync", ["window", "every"])
def test_grad_scaler_backs_off_on_both_ranks_when_one_rank_overflows(tmp_path, sync):
    """Rank 1 alone gets an inf loss in window 2 (its local batch 4). In window mode only rank 1 abandons
    the window; the skip the ranks agree on must reach rank 0's GradScaler too, or the loss scales diverge.
    In every mode the all-reduced gradient carries the inf to both ranks."""
    proc = run_ddp(tmp_path, sync=sync, n=24, model="inf_rank1", precision="16-scaler")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"full_rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert r["skipped_windows"] == 1 and r["completed_windows"] == 3
        # growth_interval=1000: without an inf the scale stays at 2^10 (windows 1, 3 and 4 show that no
        # other step overflowed); the skipped window backs it off once, to 2^9, as a skipped AdamW step does
        assert r["window_scales"] == [2.0**10, 2.0**9, 2.0**9, 2.0**9]
        assert_params_close(r["window_params"][1], r["window_params"][0], rtol=0, atol=0)  # window 2 skipped
        assert not torch.equal(r["window_params"][2][0], r["window_params"][1][0])  # window 3 stepped
        assert all(torch.isfinite(p).all() for p in r["params"])
    assert_params_close(ranks[0]["params"], ranks[1]["params"], rtol=0, atol=0)


def test_sync_window_keeps_batchnorm_buffers_identical_across_ranks(tmp_path):
    """Window mode switches DDP's gradient sync off, and with it DDP's buffer broadcast before forward. The
    ranks see different data, so their BatchNorm running statistics differ unless rank 0's are broadcast."""
    proc = run_ddp(tmp_path, sync="window", model="batchnorm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"full_rank{r}.pt") for r in range(2)]
    assert len(ranks[0]["window_buffers"]) == 2
    for w in range(2):  # after every outer step, as for the parameters
        assert_params_close(ranks[0]["window_buffers"][w], ranks[1]["window_buffers"][w], rtol=0, atol=0)
        assert_params_close(ranks[0]["window_params"][w], ranks[1]["window_params"][w], rtol=0, atol=0)
    assert_params_close(ranks[0]["buffers"], ranks[1]["buffers"], rtol=0, atol=0)
    running_mean = ranks[0]["buffers"][0]
    assert running_mean.abs().sum() > 0  # the statistics did move away from their initial zeros
