"""Smoke test of the benchmark harnesses on CPU (no timings asserted: only that they run and report)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_overhead_benchmark_runs_and_reports_a_ratio():
    proc = subprocess.run(
        [sys.executable, "benchmarks/overhead_cpu.py", "--steps", "2", "--repeats", "1", "--block", "32"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["ratio_nexus_over_plain"] > 0 and record["tokens_per_s_plain"] > 0
