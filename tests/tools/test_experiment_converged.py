"""The converged-regime preset (synthetic HMM sources with a known optimum) end to end at smoke-test size, and
the analysis pieces it adds: steps to the optimum, the equal-steps headline, the like-for-like cosine columns."""

import json
import math
from pathlib import Path

import pytest
import yaml

from lightning_nexus.tools.experiment import load_experiment
from lightning_nexus.tools.experiment.analysis import OPTIMUM_TOLERANCE, analyse, steps_to_optimum
from lightning_nexus.tools.experiment.report import headline
from tests.tools.test_experiment import ROOT, run_experiment


def result(seed: int, arm: str, losses: list[tuple[float, float]], optimal=(1.0, 2.0)) -> dict:
    """A finished run evaluated every 100 steps (logged one step early, as Lightning does) on two sources."""
    evals = [
        {"step": 100 * (i + 1) - 1, "val/loss": (a + b) / 2, "val/loss/s0": a, "val/loss/s1": b}
        for i, (a, b) in enumerate(losses)
    ]
    gap = {"s0": losses[-1][0] - optimal[0], "s1": losses[-1][1] - optimal[1]}
    return {
        "arm": arm,
        "budget": 1.0,
        "seed": seed,
        "label": arm,
        "max_steps": 100 * len(losses),
        "wall_s": 1.0,
        "evals": evals,
        "final": evals[-1],
        "evidence": {
            "diagnostics": {"optimality_gap": {**gap, "max": max(gap.values())}},
            "details": {"optimal_val_loss": {"s0": optimal[0], "s1": optimal[1], "held": 3.0}},
        },
        "series": {},
    }


def test_steps_to_optimum_is_the_first_evaluation_with_every_source_within_tolerance():
    tol = OPTIMUM_TOLERANCE
    run = result(0, "a", [(1.5, 2.5), (1.0 + tol / 2, 2.0 + 2 * tol), (1.0 + tol / 2, 2.0 + tol / 2), (1.0, 2.0)])
    assert steps_to_optimum(run) == 300  # at 200 steps source s1 is still 2 x tol away
    assert steps_to_optimum(result(0, "a", [(1.5, 2.5), (1.1, 2.0)])) is None
    no_optimum = result(0, "a", [(1.0, 2.0)])
    no_optimum["evidence"] = {}
    assert steps_to_optimum(no_optimum) is None


def test_without_a_reference_ladder_the_headline_states_equal_steps():
    runs = [result(s, "ref", [(1.2, 2.2), (1.0, 2.0)]) for s in (0, 1, 2)]
    runs += [result(s, "new", [(1.2, 2.2), (1.0, 2.0)]) for s in (0, 1, 2)]
    for r in runs:  # held-out loss: "new" lower by 0.10, 0.11, 0.12 on seeds 0, 1, 2
        r["final"]["val/loss/ood"] = 3.0 - (0.1 + r["seed"] / 100 if r["arm"] == "new" else 0.0)
    summary = analyse(runs, "ref", 0.01)
    assert headline(summary) == []  # no ladder: no loss-matched comparison
    [line] = headline(summary, "equal_steps")  # one line per arm other than the reference
    assert line == "- **new** vs ref: val/loss/ood -0.1100 ± 0.0248 (better)"  # t(0.975, 2) * 0.01 / sqrt(3) = 0.0248
    equal = {c.arm: c for c in summary["equal_steps"]}
    assert equal["new"].values["steps_to_optimum"].mean == 200 and equal["ref"].values["steps_to_optimum"].mean == 200


def test_converged_presets_load_with_the_arms_and_seeds_the_issue_asks_for():
    full = load_experiment(ROOT / "recipes" / "evidence_converged.yaml")
    tiny = load_experiment(ROOT / "recipes" / "evidence_converged_tiny.yaml")
    names = [a.name for a in full.arms]
    assert names == [a.name for a in tiny.arms] and full.reference == "adamw" and len(full.seeds) >= 5
    assert "nexus_g0" in names and sum(n.startswith("nexus_g0.") for n in names) >= 2  # gamma grid + ablation
    run = full.runs()[0].config
    # trained on past the end of the LR schedule: twice its length
    assert run["trainer"]["max_steps"] == 2 * run["model"]["init_args"]["max_steps"]
    assert run["data"]["class_path"].endswith("synthetic.HMMDataModule")
    assert max(r.config["trainer"]["max_steps"] for r in tiny.runs()) <= 30


@pytest.mark.slow
def test_tiny_converged_preset_reports_every_arm_with_the_new_measures(tmp_path: Path):
    content = {"extends": str(ROOT / "recipes" / "evidence_converged_tiny.yaml")}
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(content))
    proc = run_experiment(tmp_path, config)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    arms = ["adamw", "nexus_g0.05", "nexus_g0.1", "nexus_g0"]
    assert [c["arm"] for c in summary["equal_steps"]] == arms and summary["seeds"] == [0, 1]
    for c in summary["equal_steps"]:
        values = {k: v["mean"] for k, v in c["values"].items()}
        assert all(v["n"] == 2 for v in c["values"].values())
        assert 0 <= values["probe/latent_state"] <= 1
        for key in (
            "diag/optimality_gap/max",
            "diag/transfer/mean",
            "diag/transfer/excess@4",
            "diag/hessian_trace/all",
        ):
            assert math.isfinite(values[key]), (c["arm"], key)
        assert values["diag/optimality_gap/max"] > 0  # 30 steps are far from the optimum
        for key in ("val/grad_cosine/cross", "val/grad_cosine/within", "diag/grad_alignment/cross"):
            assert -1 <= values[key] <= 1, (c["arm"], key)
    report = (out / "report.md").read_text()
    assert "## Headline (equal steps" in report and "like for like" in report
    assert (out / "grad_alignment.png").is_file()
