"""benchmarks/precision.py (what it calls the default mode's G is that mode's G) and the CPU rehearsal of
benchmarks/gpu_suite.sh."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks import precision
from lightning_nexus import Nexus

ROOT = Path(__file__).resolve().parents[2]


def test_read_off_is_bit_for_bit_the_default_modes_pseudo_gradient():
    gen = torch.Generator().manual_seed(0)
    shapes = ((30, 20), (20,))
    a = [(torch.randn(s, generator=gen) + 1.0).requires_grad_() for s in shapes]
    b = [p.detach().clone().requires_grad_() for p in a]
    default, exact = Nexus(a, inner_lr=0.01), Nexus(b, inner_lr=0.01, exact=True)
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        default.inner_step()
        exact.inner_step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))  # the exact mode takes the very same steps
    got = [precision.read_off(anchor, q, 0.01, 3) for anchor, q in zip(exact.anchor(), b)]
    default.finish_window()
    assert all(torch.equal(g, p.grad) for g, p in zip(got, a))


def test_precision_benchmark_tiny(tmp_path):
    out = tmp_path / "precision.jsonl"
    rows = precision.main(["--tiny", "--models", "gpt2_124m", "--inner-lrs", "0.01", "--out", str(out)])
    by_kind = {r["kind"]: r for r in rows}
    assert set(by_kind) == {"embeddings", "norms", "matrices", "biases"}
    assert all(r["exact_rel_error"] < 1e-5 for r in rows)
    # norm gains sit at 1.0, where γ·d is a few ulps: the read-off is far worse there than the exact mode
    assert by_kind["norms"]["read_off_rel_error"] > 100 * by_kind["norms"]["exact_rel_error"]
    assert all(0 < r["minibatch_noise"] < 2 for r in rows)
    assert [json.loads(line)["kind"] for line in out.read_text().splitlines()] == [r["kind"] for r in rows]


@pytest.mark.slow
def test_gpu_suite_rehearsal_on_cpu(tmp_path):
    env = {
        **os.environ,
        "RESULTS_DIR": str(tmp_path),
        "SKIP_TESTS": "1",
        "SKIP_EXACT": "1",
        "ONLY_MODEL": "gpt:tiny",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_suite.sh"), "--tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "gpu_suite.jsonl").read_text().splitlines()]
    assert [r.get("step", r["benchmark"]) for r in records] == ["environment", "throughput"]
    assert records[1]["model"]["spec"] == "gpt:tiny" and records[1]["device"] == "cpu"
    assert "gpt:tiny       default adamw" in proc.stdout
