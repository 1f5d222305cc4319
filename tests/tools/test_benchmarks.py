"""Smoke tests of the benchmark harnesses on CPU (no timings asserted: only that they run and report),
and the arithmetic of the shared A/B module."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.ab import alternate, ratio, spread

ROOT = Path(__file__).resolve().parents[2]
# One intra-op thread: on a loaded 2-core machine two OpenMP threads per tiny op wait on each other's time
# slices and make these smoke runs several times slower; nothing asserted here depends on threads.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run_module(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_alternate_runs_arms_in_balanced_order_and_drops_warmup_rounds():
    order, seen = [], []
    runs = alternate(
        {"a": lambda: order.append("a") or len(order), "b": lambda: order.append("b") or len(order)},
        repeats=3,
        warmup=1,
        on_result=lambda i, arm, r: seen.append((i, arm)),
    )
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert runs == {"a": [4, 5, 8], "b": [3, 6, 7]}
    assert seen[:2] == [(-1, "a"), (-1, "b")] and seen[-1] == (2, "a")
    with pytest.raises(ValueError):
        alternate({"a": lambda: 1}, repeats=0)


def test_ratio_is_the_ratio_of_medians_with_paired_spread():
    r = ratio([9.0, 12.0, 10.0], [10.0, 10.0, 8.0])
    assert r.value == pytest.approx(10.0 / 10.0)
    assert (r.paired.low, r.paired.median, r.paired.high) == pytest.approx((0.9, 1.2, 1.25))
    assert spread([3.0, 1.0, 2.0, 10.0]).median == 2.5
    with pytest.raises(ValueError):
        ratio([1.0], [1.0, 2.0])


def test_overhead_benchmark_runs_and_reports_a_ratio():
    proc = _run_module("benchmarks.overhead_cpu", "--steps", "2", "--repeats", "1", "--block", "32")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["ratio_nexus_over_plain"] > 0 and record["tokens_per_s_plain"] > 0
    low, high = record["ratio_nexus_over_plain_range"]
    assert low == high  # one round: the per-round range is that round's ratio


def test_fabric_overhead_benchmark_runs_and_reports_a_ratio():
    proc = _run_module("benchmarks.fabric_overhead_cpu", "--steps", "1", "--repeats", "1", "--block", "32")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["benchmark"] == "fabric_overhead_cpu"
    assert record["ratio_nexus_over_plain"] > 0 and record["tokens_per_s_plain"] > 0


def test_throughput_harness_reports_every_field_for_both_loops(tmp_path, capsys):
    # In-process (main() restores the settings it changes): a fresh interpreter would spend most of this
    # test importing torch and Lightning. The `python -m benchmarks...` entry is exercised above.
    from benchmarks.throughput import main

    out = tmp_path / "results" / "throughput.jsonl"
    out.parent.mkdir()
    out.write_text('{"earlier": "line"}\n')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see ENV
    try:
        returned = main(
            [
                "--model",
                "gpt:tiny",
                "--batch-size",
                "2",
                "--block",
                "16",
                "--accumulate",
                "2",
                "--steps",
                "2",
                "--warmup-steps",
                "1",
                "--repeats",
                "1",
                "--loop",
                "both",
                "--device",
                "cpu",
                "--json",
                str(out),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    assert "nexus/adamw: throughput" in stdout and "lightning/plain throughput" in stdout
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == {"earlier": "line"}  # appended, one line per invocation
    record = json.loads(lines[1])
    assert record == json.loads(json.dumps(returned))

    for key in (
        "date",
        "command",
        "args",
        "torch",
        "lightning",
        "device",
        "device_name",
        "model",
        "tokens_per_step",
        "peak_flops",
        "arms",
        "ratios",
    ):
        assert key in record, key
    assert record["benchmark"] == "throughput" and record["device"] == "cpu" and record["peak_flops"] is None
    assert record["command"].startswith("python -m benchmarks.throughput --model gpt:tiny")
    assert record["args"]["accumulate"] == 2 and record["args"]["loop"] == "both"
    assert record["tokens_per_step"] == 2 * 16 * 2
    assert record["model"]["params"] > 0 and record["model"]["flops_per_token"] > 6 * record["model"]["params"] / 2

    assert set(record["arms"]) == {"lightning/adamw", "lightning/nexus", "plain/adamw", "plain/nexus"}
    for arm in record["arms"].values():
        assert arm["tokens_per_s"] > 0 and arm["cpu_tokens_per_s"] > 0
        assert arm["step_s"] == pytest.approx(record["tokens_per_step"] / arm["tokens_per_s"])
        assert arm["mfu"] is None and arm["peak_mem_bytes"] is None and arm["start_mem_bytes"] is None
        assert math.isfinite(arm["last_loss"]) and 0 < arm["last_loss"] < 10  # log(256) ≈ 5.5 at init
        assert arm["tokens_per_s_range"] == [arm["tokens_per_s"]] * 2 == [arm["rounds_tokens_per_s"][0]] * 2

    arms = record["arms"]
    for loop in ("lightning", "plain"):
        r = record["ratios"][loop]
        expected = arms[f"{loop}/nexus"]["tokens_per_s"] / arms[f"{loop}/adamw"]["tokens_per_s"]
        assert r["throughput_nexus_over_adamw"] == pytest.approx(expected, rel=1e-9)
        expected_cpu = arms[f"{loop}/nexus"]["cpu_tokens_per_s"] / arms[f"{loop}/adamw"]["cpu_tokens_per_s"]
        assert r["throughput_nexus_over_adamw_cpu_time"] == pytest.approx(expected_cpu, rel=1e-9)
        assert r["peak_mem_diff_bytes"] is None and r["peak_mem_diff_over_fp32_params"] is None
    lop = record["ratios"]["lightning_over_plain"]
    assert lop["nexus"] == pytest.approx(arms["lightning/nexus"]["tokens_per_s"] / arms["plain/nexus"]["tokens_per_s"])


def test_throughput_harness_names_the_valid_models_and_checks_the_shape(capsys):
    from benchmarks.throughput import main, parse_model

    with pytest.raises(SystemExit):
        main(["--model", "gpt:124m"])
    err = capsys.readouterr().err
    assert "gpt:gpt2_124m" in err and "llama:1b" in err
    with pytest.raises(SystemExit):
        main(["--model", "gpt:tiny", "--block", "4096"])  # beyond the preset's context length
    assert "exceeds the context length" in capsys.readouterr().err
    assert parse_model("llama:1b", vocab_size=256).config().vocab_size == 256
