"""NexusCallback under FSDP1 (NexusFSDPStrategy) with 2 CPU processes (gloo).

All scenarios run in one launch of two worker processes (one Lightning import per rank instead of one per
scenario: CPU is scarce); each test reads the results of its scenario.
"""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import StrategyRegistry

from lightning_nexus import NexusCallback, NexusFSDPStrategy
from tests.helpers import MLPModule, assert_params_close, boring_batches, reference_nexus_training

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ["full_shard", "shard_grad_op_gamma0", "flat_params_clip", "no_shard", "save", "resume"]
K, N, GAMMA, LR, CLIP = 3, 12, 0.1, 0.1, 0.3  # as in fsdp1_worker.py (LR: MLPModule's SGD)


@pytest.fixture(scope="module")
def fsdp1_runs(tmp_path_factory):
    """Start both ranks ourselves (Lightning then launches nothing) and run every scenario once."""
    out = tmp_path_factory.mktemp("fsdp1")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(31500 + os.getpid() % 1000),
        "WORLD_SIZE": "2",
        "NODE_RANK": "0",
    }
    logs = [out / f"rank{rank}.log" for rank in range(2)]  # files, not pipes: a full pipe would stall a rank
    procs = []
    for rank, log in enumerate(logs):
        with open(log, "w") as f:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(ROOT / "tests/plugin/fsdp1_worker.py"), str(out), *SCENARIOS],
                    cwd=out,
                    env={**env, "LOCAL_RANK": str(rank)},
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:  # a rank that died leaves the other waiting in a collective
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log.read_text()[-3000:]

    def load(scenario):
        return [torch.load(out / f"{scenario}_rank{r}.pt", weights_only=False) for r in range(2)]

    return SimpleNamespace(out=out, load=load)


def global_micro_batches():
    """What the two ranks see together: rank r gets batches r, r+2, ...; FSDP averages their gradients."""
    batches = boring_batches(n=N)
    return [torch.cat([batches[2 * i], batches[2 * i + 1]]) for i in range(N // 2)]


def reference(inner_lr=GAMMA, clip_norm=None):
    return reference_nexus_training(
        MLPModule(), global_micro_batches(), K=K, inner_lr=inner_lr, normalize=True, clip_norm=clip_norm
    )


def ranks_agree(rank0, rank1):
    assert rank0["global_step"] == rank1["global_step"] == N // 2 // K
    assert_params_close(rank0["params"], rank1["params"], rtol=0, atol=0)


@pytest.mark.slow
def test_full_shard_equals_single_process_on_the_global_micro_batch(fsdp1_runs):
    # Lightning's defaults: FULL_SHARD, use_orig_params=True, the root wrapped only. Rank 0's half of the
    # one flat parameter lies inside the first weight (512 of ~562 elements): the other parameters are
    # 0-sized views there, with .grad None, while rank 1 has gradients for all of them.
    rank0, rank1 = fsdp1_runs.load("full_shard")
    ranks_agree(rank0, rank1)
    assert_params_close(rank0["params"], reference())


@pytest.mark.slow
def test_logged_norms_are_global_over_the_shards(fsdp1_runs):
    sharded, whole = fsdp1_runs.load("full_shard")[0], fsdp1_runs.load("no_shard")[0]
    for got, want in zip(sharded["metrics"], whole["metrics"]):  # NO_SHARD: whole tensors, nothing to reduce
        assert got["nexus/pseudo_grad_norm"] == pytest.approx(want["nexus/pseudo_grad_norm"], rel=1e-6)
    # first window from a fresh SGD: outer step = LR·‖G‖ and inner displacement = γ·K·‖G‖, so the ratio of
    # inner displacement (pseudo_grad_norm) to ‖θ − θ0‖ (distance_to_anchor) is γK/LR with global norms
    assert sharded["metrics"][0]["nexus/inner_to_outer_ratio"] == pytest.approx(GAMMA * K / LR, rel=1e-5)


@pytest.mark.slow
def test_shard_grad_op_auto_wrapped_with_gamma_zero_equals_reference(fsdp1_runs):
    rank0, rank1 = fsdp1_runs.load("shard_grad_op_gamma0")  # one FSDP unit per Linear, plus the root
    ranks_agree(rank0, rank1)
    assert_params_close(rank0["params"], reference(inner_lr=0.0))


@pytest.mark.slow
def test_norm_clipping_on_flat_parameters_equals_reference_with_clipping(fsdp1_runs):
    rank0, rank1 = fsdp1_runs.load("flat_params_clip")  # use_orig_params=False: the optimizer holds flat shards
    ranks_agree(rank0, rank1)
    want = reference(clip_norm=CLIP)
    assert_params_close(rank0["params"], want)
    unclipped = reference()
    assert max((a - b).norm().item() for a, b in zip(want, unclipped)) > 1e-2  # the clip did bite


@pytest.mark.slow
def test_no_shard_equals_reference(fsdp1_runs):
    rank0, rank1 = fsdp1_runs.load("no_shard")
    ranks_agree(rank0, rank1)
    assert_params_close(rank0["params"], reference())


@pytest.mark.slow
def test_mid_window_checkpoint_stores_anchor_and_resumes(fsdp1_runs):
    anchor = torch.load(fsdp1_runs.out / "anchor.pt")
    saved = torch.load(fsdp1_runs.out / "mid.ckpt", weights_only=False)["state_dict"]  # full: gathered on rank 0
    names = [name for name, _ in MLPModule().named_parameters()]
    assert_params_close([saved[n] for n in names], anchor, rtol=0, atol=0)  # θ0 of the window, not θ_2
    # saving swapped θ0 into the shards and back: training went on exactly as without the checkpoint
    assert_params_close(
        fsdp1_runs.load("save")[0]["params"], fsdp1_runs.load("full_shard")[0]["params"], rtol=0, atol=0
    )

    resumed = fsdp1_runs.load("resume")
    ranks_agree(*resumed)
    # the checkpoint's weights are θ0 and its NexusCallback state the window's inner point: the resumed run
    # continues the window from θ_2, where the interrupted one was
    assert_params_close(resumed[0]["start"], torch.load(fsdp1_runs.out / "inner.pt"), rtol=0, atol=0)
    assert all(torch.isfinite(p).all() for p in resumed[0]["params"])


# ---------------------------------------------------------------- in-process, no workers


def test_nexus_fsdp_is_registered_and_accepted_by_the_callback():
    strategy = StrategyRegistry.get("nexus_fsdp")
    assert isinstance(strategy, NexusFSDPStrategy)
    trainer = SimpleNamespace(strategy=strategy, accumulate_grad_batches=4, callbacks=[])
    NexusCallback().setup(trainer, BoringModel(), "fit")


def test_hybrid_sharding_is_refused():
    with pytest.raises(ValueError, match="FULL_SHARD or SHARD_GRAD_OP"):
        NexusFSDPStrategy(sharding_strategy="HYBRID_SHARD", auto_wrap_policy={torch.nn.Linear})
