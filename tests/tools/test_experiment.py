"""``lightning-nexus experiment`` end to end: the tiny preset trains every arm, writes the report, and a
rerun trains only what is missing; a failing arm is reported without losing the others."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_nexus.tools.experiment.provenance import source_fingerprint

ROOT = Path(__file__).resolve().parents[2]


def run_experiment(tmp_path: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        "PYTHONPATH": str(ROOT),
        "PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LIGHTNING_NEXUS_CACHE": str(tmp_path / "cache"),
    }
    cmd = [
        sys.executable,
        "-m",
        "lightning_nexus",
        "experiment",
        "--config",
        str(config),
        "--out",
        str(tmp_path / "out"),
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def small(tmp_path: Path, **over) -> Path:
    """The tiny preset on a small corpus (builds in about a second)."""
    content = {
        "extends": str(ROOT / "recipes" / "evidence_tiny.yaml"),
        "set": {"data.init_args.corpus_bytes_per_source": 100_000},
    }
    content.update(over)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


@pytest.mark.slow
def test_tiny_preset_reports_every_arm_and_resumes(tmp_path):
    proc = run_experiment(tmp_path, small(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    report = (out / "report.md").read_text()
    arms = ["adamw", "nexus_g0.05", "nexus_g0.1", "nexus_g0", "nexus_raw", "nexus_sample", "muon", "muon_nexus"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    for table in ("equal_steps", "matched_trajectory"):
        assert [c["arm"] for c in summary[table]] == arms
    for c in summary["equal_steps"]:
        values = {k: v["mean"] for k, v in c["values"].items()}
        assert 0 < values["val/loss"] < 6 and 0 < values["val/loss/ood"] < 6, (c["arm"], values)
        assert 0 <= values["probe/arith_transfer"] <= 1 and 0 <= values["probe/grammar_depth"] <= 1
        assert all(math.isfinite(values[f"diag/hessian_trace/{s}"]) for s in ("code", "prose", "math", "formal"))
        assert values["diag/finetune/mean_to_start"] > 0
        assert all(v["n"] == 2 for v in c["values"].values())  # both seeds of every arm finished
    nexus_runs = [r for r in summary["equal_steps"] if r["arm"].startswith(("nexus", "muon_nexus"))]
    assert all("grad_cosine/end" in r["values"] for r in nexus_runs)
    for c in summary["equal_steps"]:  # the like-for-like cosines exist for every arm, AdamW included
        for key in ("val/grad_cosine/cross", "val/grad_cosine/within", "diag/grad_alignment/cross"):
            assert -1 <= c["values"][key]["mean"] <= 1, (c["arm"], key)
    for arm in arms:
        assert f"| {arm}" in report
    for png in ("ood_vs_loss.png", "probes.png", "diagnostics.png", "grad_cosine.png", "grad_alignment.png"):
        assert (out / png).is_file()

    # nothing left to do: no run is retrained
    results = sorted(out.glob("runs/*/seed*/result.json"))
    assert len(results) == 22
    stamps = {p: p.stat().st_mtime_ns for p in results}
    proc = run_experiment(tmp_path, small(tmp_path))
    assert proc.returncode == 0 and "22 already finished, 0 to train" in proc.stdout, proc.stdout[-2000:]
    assert {p: p.stat().st_mtime_ns for p in results} == stamps

    # every run records the code it was trained on: this checkout's sources
    assert {json.loads(p.read_text())["provenance"]["code"] for p in results} == {source_fingerprint()}
    assert "trained on: code " + source_fingerprint() in report

    # an interrupted run (no result.json) is trained again, alone; a finished run of other code is named
    (out / "runs" / "nexus_g0" / "seed1" / "result.json").unlink()
    older = out / "runs" / "adamw" / "seed0" / "result.json"
    result = json.loads(older.read_text())
    result["provenance"]["code"] = "0123456789ab"
    older.write_text(json.dumps(result))
    proc = run_experiment(tmp_path, small(tmp_path), "--workers", "1")
    assert proc.returncode == 0 and "21 already finished, 1 to train" in proc.stdout, proc.stdout[-2000:]
    assert "nexus_g0/seed1" in proc.stdout
    assert (
        "1 finished run(s) were trained on other code" in proc.stdout
        and "adamw/seed0 (code 0123456789ab" in proc.stdout
    )
    report = (out / "report.md").read_text()
    assert "trained on 2 different versions" in report and "adamw/seed0" in report.split("different versions")[1]


@pytest.mark.slow
def test_a_failing_arm_is_reported_and_the_others_finish(tmp_path):
    config = small(
        tmp_path,
        seeds=[0],
        arms=[{"name": "adamw", "budgets": [1.0, 1.5]}, {"name": "broken", "set": {"model.init_args.lr": -1.0}}],
    )
    proc = run_experiment(tmp_path, config)
    assert proc.returncode != 0
    assert "broken/seed0: exit code" in proc.stdout and "lr=-1.0 must be > 0" in proc.stdout, proc.stdout[-3000:]
    assert "1 run(s) failed" in proc.stderr
    out = tmp_path / "out"
    assert (out / "runs" / "adamw" / "seed0" / "result.json").is_file()
    assert (out / "runs" / "broken" / "seed0" / "fit.log").is_file()
    assert "run failed: broken/seed0" in (out / "report.md").read_text()
