"""GradSimilarityMonitor with 2 CPU processes (gloo): DDP (NexusDDPStrategy and stock DDP without Nexus)
and FSDP2. Both ranks must log the same numbers, equal to the gradients of the global micro-batch
computed here in one process."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from monitor_worker import NAMES, K, batches, loss_fn, make_net  # noqa: E402

pytestmark = pytest.mark.slow
N = 12  # 6 micro-batches per rank = 2 windows of K=3


def global_gradient(params, batch_a, batch_b) -> torch.Tensor:
    net = make_net()
    with torch.no_grad():
        for p, q in zip(net.parameters(), params):
            p.copy_(q)
    both = {key: torch.cat([batch_a[key], batch_b[key]]) for key in batch_a}
    loss_fn(net, both).backward()
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()]).double()


# FSDP2 allows one monitor per Trainer, so its two runs split the modes between them.
@pytest.mark.parametrize(
    "strategy,nexus,modes",
    [
        ("nexus_ddp", "nexus", "exact,sketch"),
        ("ddp", "plain", "exact,sketch"),
        ("fsdp2", "nexus", "sketch"),
        ("fsdp2", "plain", "exact"),
    ],
)
def test_ranks_agree_and_equal_one_process_on_the_global_micro_batch(tmp_path, strategy, nexus, modes):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_PORT": str(31500 + os.getpid() % 1000)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests/plugin/monitor_worker.py"), str(tmp_path), strategy, nexus, str(N), modes],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert len(rank0["windows"]) == 2
    data = batches(N)
    for w, (window0, window1) in enumerate(zip(rank0["windows"], rank1["windows"])):
        for got0, got1 in zip(window0, window1):  # exact and sketch: identical on both ranks
            assert torch.equal(got0["cosine"], got1["cosine"]) and got0["pairs"] == got1["pairs"]
        grads = [global_gradient(rank0["params"][k], data[2 * k], data[2 * k + 1]) for k in range(w * K, (w + 1) * K)]
        want = torch.stack([torch.stack([a @ b / (a.norm() * b.norm()) for b in grads]) for a in grads])
        for mode, got in zip(modes.split(","), window0):
            assert got["labels"] == tuple(NAMES[k % 3] for k in range(w * K, (w + 1) * K))
            if mode == "sketch":  # 66 parameters in 64 buckets: a real sketch, so only close
                assert (got["cosine"] - want).abs().max() < 0.3
                continue
            assert torch.allclose(got["cosine"], want, atol=1e-5), (got["cosine"], want)
            assert torch.allclose(got["norms"], torch.stack([g.norm() for g in grads]), rtol=1e-5)
            for a, b in itertools.combinations(range(K), 2):
                pair = "__".join(sorted((got["labels"][a], got["labels"][b])))
                assert got["pairs"][pair] == pytest.approx(float(want[a, b]), abs=1e-5)
    if nexus == "nexus":  # the monitor saw the inner trajectory, not one point per window
        assert not torch.equal(rank0["params"][0][0], rank0["params"][1][0])
