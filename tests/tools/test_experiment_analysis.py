"""Paired statistics and loss matching of the experiment, checked against values worked out by hand."""

import json
import math

import pytest

from lightning_nexus.tools.experiment.analysis import (
    Estimate,
    analyse,
    equal_steps,
    interpolate,
    matched_along_trajectory,
    matched_own_schedules,
)
from lightning_nexus.tools.experiment.report import write_report


def result(arm, seed, budget, evals, diagnostics=None, cosine=None):
    return {
        "arm": arm,
        "seed": seed,
        "budget": budget,
        "label": arm,
        "max_steps": 100,
        "wall_s": 1.0,
        "evals": evals,
        "final": evals[-1],
        "evidence": {"diagnostics": diagnostics or {}},
        "series": {"nexus/grad_cosine/mean": cosine} if cosine else {},
    }


def ev(step, loss, ood, probe=None):
    point = {"step": step, "val/loss": loss, "val/loss/ood": ood}
    if probe is not None:
        point["probe/arith"] = probe
    return point


def test_estimate_matches_the_t_interval_by_hand():
    e = Estimate.of([1.0, 2.0, 3.0, 4.0, 5.0])
    sd = math.sqrt(sum((x - 3) ** 2 for x in [1, 2, 3, 4, 5]) / 4)
    assert e.mean == 3.0 and e.n == 5
    assert e.ci == pytest.approx(2.776 * sd / math.sqrt(5), rel=1e-4)
    assert e.excludes_zero
    assert not Estimate.of([-1.0, 1.0, 0.5]).excludes_zero
    assert math.isnan(Estimate.of([2.0]).ci) and not Estimate.of([2.0]).excludes_zero
    assert Estimate.of([None, float("nan")]) is None


def test_interpolate():
    pts = [(3.0, 30.0), (1.0, 10.0), (2.0, 25.0)]
    assert interpolate(pts, 1.5) == pytest.approx(17.5)
    assert interpolate(pts, 2.5) == pytest.approx(27.5)
    assert interpolate(pts, 3.5) is None


def ladder(seed, slope=2.0, offset=0.0):
    """Reference runs at 3 budgets whose final OOD is offset + slope * loss."""
    return [
        result("ref", seed, b, [ev(10, 3.0, 9.0), ev(20, loss, offset + slope * loss)])
        for b, loss in ((0.8, 2.6), (1.0, 2.5), (1.2, 2.4))
    ]


def test_matched_own_schedules_interpolates_the_reference_ladder():
    results = []
    for seed, (loss, ood) in enumerate([(2.45, 4.80), (2.42, 4.85), (2.55, 5.02)]):
        results += ladder(seed) + [result("arm", seed, 1.0, [ev(10, 3.0, 9.0), ev(20, loss, ood)])]
    (cmp,) = matched_own_schedules(results, "ref", tol=0.005)
    # reference OOD at the arm's loss is 2*loss: deltas by hand
    expected = [4.80 - 4.90, 4.85 - 4.84, 5.02 - 5.10]
    assert cmp.deltas["val/loss/ood"].mean == pytest.approx(sum(expected) / 3)
    assert cmp.deltas["val/loss"].mean == pytest.approx(0.0, abs=1e-12)  # matched by construction
    assert cmp.flagged_seeds == []


def test_loss_outside_the_ladder_is_compared_with_its_end_and_flagged():
    results = ladder(0) + [result("arm", 0, 1.0, [ev(10, 3.0, 9.0), ev(20, 2.30, 4.0)])]
    (cmp,) = matched_own_schedules(results, "ref", tol=0.005)
    assert cmp.flagged_seeds == [0]
    assert cmp.deltas["val/loss/ood"].mean == pytest.approx(4.0 - 4.8)  # against the 1.2x end (loss 2.4)
    assert cmp.deltas["val/loss"].mean == pytest.approx(2.30 - 2.40)


def test_a_single_budget_reference_cannot_be_loss_matched():
    results = [result("ref", 0, 1.0, [ev(1, 2.5, 5.0)]), result("arm", 0, 1.0, [ev(1, 2.4, 4.0)])]
    (cmp,) = matched_own_schedules(results, "ref", tol=0.005)
    assert cmp.deltas == {} and any("need >= 2" in n for n in cmp.notes)


def test_equal_steps_pairs_by_seed_and_flags_unmatched_losses():
    results = [
        result("ref", 0, 1.0, [ev(20, 2.50, 5.0, 0.30)], {"trace": {"all": 10.0}}),
        result("ref", 1, 1.0, [ev(20, 2.60, 5.2, 0.20)], {"trace": {"all": 12.0}}),
        result("arm", 0, 1.0, [ev(20, 2.502, 4.9, 0.35)], {"trace": {"all": 8.0}}),
        result("arm", 1, 1.0, [ev(20, 2.50, 5.0, 0.30)], {"trace": {"all": 9.0}}),
        result("ref", 0, 1.2, [ev(24, 2.40, 4.0)]),  # other budgets do not enter equal-steps
    ]
    ref, arm = equal_steps(results, "ref", tol=0.005)
    assert arm.deltas["val/loss/ood"].mean == pytest.approx((-0.1 - 0.2) / 2)
    assert arm.deltas["probe/arith"].mean == pytest.approx((0.05 + 0.10) / 2)
    assert arm.deltas["diag/trace/all"].mean == pytest.approx(-2.5)
    assert arm.values["val/loss"].mean == pytest.approx(2.501)
    assert arm.flagged_seeds == [1]  # 2.50 vs 2.60; seed 0 differs by 0.002 only
    assert ref.deltas["val/loss"].mean == 0.0


def test_trajectory_matching_uses_the_loss_every_arm_reached():
    results = [
        result("ref", 0, 1.0, [ev(10, 3.0, 6.0), ev(20, 2.6, 5.2)]),
        result("arm", 0, 1.0, [ev(10, 2.8, 5.0), ev(20, 2.4, 4.6)]),
    ]
    comparisons, levels = matched_along_trajectory(results, "ref")
    assert levels == {0: 2.6}  # the highest of the per-arm minima
    arm = comparisons[1]
    # arm at loss 2.6: halfway between (2.8, 5.0) and (2.4, 4.6) -> 4.8; reference at 2.6 -> 5.2
    assert arm.deltas["val/loss/ood"].mean == pytest.approx(4.8 - 5.2)


def test_report_lists_every_arm_and_writes_plots(tmp_path):
    results = []
    for seed in range(3):
        results += ladder(seed)
        for arm, shift in (("nexus", -0.05), ("nexus_g0", 0.0)):
            results.append(
                result(
                    arm,
                    seed,
                    1.0,
                    [ev(10, 3.0, 9.0, 0.1), ev(20, 2.45 + 0.01 * seed, 4.9 + shift + 0.02 * seed, 0.3)],
                    {"trace": {"all": 5.0 + seed}},
                    cosine=[(1, 0.1), (2, 0.2 + seed / 10)],
                )
            )
    for r in results:
        r["final"].setdefault("probe/arith", 0.25)
        for e in r["evals"]:
            e.setdefault("probe/arith", 0.25)
    path = write_report(results, tmp_path, "ref", 0.005, command="lightning-nexus experiment --config x.yaml")
    text = path.read_text()
    for arm in ("ref (reference)", "nexus", "nexus_g0"):
        assert f"| {arm}" in text
    assert "val/loss/ood -0.0500" in text  # headline: nexus OOD shift at matched loss, as built
    for png in ("ood_vs_loss.png", "probes.png", "diagnostics.png", "grad_cosine.png"):
        assert (tmp_path / png).stat().st_size > 1000
    summary = json.loads((tmp_path / "summary.json").read_text())
    nexus = next(c for c in summary["matched_own_schedules"] if c["arm"] == "nexus")
    assert nexus["deltas"]["val/loss/ood"]["mean"] == pytest.approx(-0.05)


def test_report_compares_diagnostics_at_matched_loss_and_at_equal_steps(tmp_path):
    # the reference's trace falls with its loss (100 x loss); the arm ends at loss 2.45 with trace 200
    results = [
        result("ref", 0, b, [ev(20, loss, 5.0)], {"trace": 100 * loss})
        for b, loss in ((0.8, 2.6), (1.0, 2.5), (1.2, 2.4))
    ]
    results.append(result("nexus", 0, 1.0, [ev(20, 2.45, 5.0)], {"trace": 200.0}))
    text = write_report(results, tmp_path, "ref", 0.005).read_text()
    section = text.split("## 4.")[1].split("## Plots")[0]
    matched, steps = section.split("At equal steps")
    assert "(-45.0000)" in matched  # 200 - 100 * 2.45
    assert "(-50.0000)" in steps  # 200 - 250 at the reference's own 1.0x budget


def test_report_flags_fine_tunes_that_raised_the_loss(tmp_path):
    results = ladder(0)
    results.append(
        result("nexus", 0, 1.0, [ev(10, 3.0, 9.0), ev(20, 2.45, 4.9)], {"finetune": {"mean_loss_drop": -0.3}})
    )
    results.append(
        result("nexus_g0", 0, 1.0, [ev(10, 3.0, 9.0), ev(20, 2.45, 4.9)], {"finetune": {"mean_loss_drop": 0.05}})
    )
    text = write_report(results, tmp_path, "ref", 0.005).read_text()
    problems = text.split("## Problems")[1]
    assert "nexus: the fine-tune diagnostic raised the loss (seeds [0])" in problems
    assert "nexus_g0:" not in problems


def test_analyse_needs_the_reference():
    with pytest.raises(ValueError, match="reference arm 'ref'"):
        analyse([result("arm", 0, 1.0, [ev(1, 2.0, 3.0)])], "ref", 0.005)
