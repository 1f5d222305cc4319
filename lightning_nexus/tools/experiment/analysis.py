"""Paired statistics over seeds: every arm against the reference arm, three ways.

1. **equal steps**: final values after the same number of optimizer steps. An arm whose in-distribution
   loss differs from the reference's by more than the tolerance is flagged: its other differences may
   just be "more/less trained", which is not the paper's claim.
2. **matched loss, own schedules** (the honest test of "same loss, better downstream"): the reference
   arm is trained at several step budgets, each completing its own LR schedule; its end points give
   metric-vs-loss curves, interpolated (linearly in in-distribution loss) at each arm's final loss.
   A run whose loss lies outside the reference's budget range more than the tolerance is flagged.
3. **matched loss, along the trajectory**: all arms interpolated at the highest in-distribution loss
   every arm of the seed reached at an evaluation. Confounded by the LR schedule, shown
   because it needs no extra runs.

Differences are arm − reference per seed (same initial weights and data order), summarised as
mean ± 95% CI half-width (Student t, n−1 degrees of freedom).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from statistics import mean, stdev
from typing import Any

from lightning_nexus.tools.compare import interpolate_at_train_loss

LOSS = "val/loss"
"""In-distribution validation loss: the "pretraining loss" that arms are matched on."""

# Two-sided 95% Student-t quantiles t_{0.975, df}: the standard table, df = 1..30.
_T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


def t975(df: int) -> float:
    if df < 1:
        return math.nan
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df  # within 0.002 of the exact value for df > 30


@dataclass
class Estimate:
    """Mean and 95% CI half-width of per-seed values (``ci`` is NaN with fewer than 2 seeds)."""

    mean: float
    ci: float
    n: int

    @staticmethod
    def of(values: Iterable[float | None]) -> Estimate | None:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if not finite:
            return None
        ci = t975(len(finite) - 1) * stdev(finite) / math.sqrt(len(finite)) if len(finite) > 1 else math.nan
        return Estimate(mean(finite), ci, len(finite))

    @property
    def excludes_zero(self) -> bool:
        return math.isfinite(self.ci) and abs(self.mean) > self.ci

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "ci95": self.ci, "n": self.n}


@dataclass
class Comparison:
    """One arm against the reference under one matching rule."""

    arm: str
    values: dict[str, Estimate | None]  # metric -> the arm's own values
    deltas: dict[str, Estimate | None]  # metric -> arm − reference
    flagged_seeds: list[int] = field(default_factory=list)  # seeds whose losses are not matched within tolerance
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "arm": self.arm,
            "values": {k: v.to_dict() if v else None for k, v in self.values.items()},
            "deltas": {k: v.to_dict() if v else None for k, v in self.deltas.items()},
            "flagged_seeds": self.flagged_seeds,
            "notes": self.notes,
        }


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of y at x through (x, y) points in any order; None outside their range."""
    return interpolate_at_train_loss(sorted(points), x)


def run_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Final evaluation values, flattened diagnostics and the end-of-training gradient cosine of one run."""
    out = {k: float(v) for k, v in result["final"].items() if k != "step"}
    for key, value in _flatten(result.get("evidence", {}).get("diagnostics", {}), "diag").items():
        out[key] = value
    cosine = result.get("series", {}).get("nexus/grad_cosine/mean")
    if cosine:
        tail = [v for _, v in cosine[-max(1, len(cosine) // 5) :]]  # last fifth: one logged value is noisy
        out["grad_cosine/end"] = mean(tail)
    reached = steps_to_optimum(result)
    if reached is not None:
        out["steps_to_optimum"] = float(reached)
    return out


OPTIMUM_TOLERANCE = 0.01
"""Nats above a known optimal loss within which a source counts as at the optimum (``steps_to_optimum``)."""


def steps_to_optimum(result: dict[str, Any]) -> int | None:
    """Optimizer steps until the first evaluation at which every train source's validation loss is within
    ``OPTIMUM_TOLERANCE`` of its exact optimum; ``None`` without a known optimum (``EvidenceCallback`` writes
    it for data modules that have one) or when no evaluation got there."""
    details = result.get("evidence", {}).get("details", {})
    optimal = details.get("optimal_val_loss")
    sources = [s for s in result.get("evidence", {}).get("diagnostics", {}).get("optimality_gap", {}) if s != "max"]
    if not optimal or not sources:
        return None
    offset = result["max_steps"] - result["final"]["step"]  # loggers record validations one step before the count
    for e in result["evals"]:
        losses = [e.get(f"{LOSS}/{s}") for s in sources]
        if (
            all(v is not None for v in losses)
            and max(v - optimal[s] for v, s in zip(losses, sources)) <= OPTIMUM_TOLERANCE
        ):
            return e["step"] + offset
    return None


def _flatten(tree: Any, prefix: str) -> dict[str, float]:
    if isinstance(tree, dict):
        out: dict[str, float] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix: float(tree)}
    return {}


def _by_seed(results: list[dict[str, Any]], arm: str, budget: float = 1.0) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in results if r["arm"] == arm and r["budget"] == budget}


def arms_in(results: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in results:
        if r["arm"] not in seen:
            seen.append(r["arm"])
    return seen


def equal_steps(results: list[dict[str, Any]], reference: str, tol: float) -> list[Comparison]:
    ref_metrics = {s: run_metrics(r) for s, r in _by_seed(results, reference).items()}
    out = []
    for arm in arms_in(results):
        metrics = {s: run_metrics(r) for s, r in _by_seed(results, arm).items()}
        keys = sorted({k for m in metrics.values() for k in m})
        seeds = sorted(set(metrics) & set(ref_metrics))
        values = {k: Estimate.of([m.get(k) for m in metrics.values()]) for k in keys}
        deltas = {k: Estimate.of([_diff(metrics[s].get(k), ref_metrics[s].get(k)) for s in seeds]) for k in keys}
        flagged = [s for s in seeds if abs(metrics[s][LOSS] - ref_metrics[s][LOSS]) > tol] if arm != reference else []
        out.append(Comparison(arm, values, deltas, flagged))
    return out


def matched_own_schedules(results: list[dict[str, Any]], reference: str, tol: float) -> list[Comparison]:
    ladder_budgets = sorted({r["budget"] for r in results if r["arm"] == reference})
    ladders: dict[int, list[dict[str, float]]] = {}  # per seed: the reference's end point at every budget
    for r in results:
        if r["arm"] == reference:
            ladders.setdefault(r["seed"], []).append(run_metrics(r))
    out = []
    for arm in arms_in(results):
        if arm == reference:
            continue
        values: dict[str, list[float]] = {}
        deltas: dict[str, list[float | None]] = {}
        flagged, notes = [], []
        for seed, run in sorted(_by_seed(results, arm).items()):
            ladder = ladders.get(seed, [])
            if len(ladder) < 2:
                notes.append(f"seed {seed}: the reference has {len(ladder)} budget run(s); need >= 2 to interpolate")
                continue
            mine = run_metrics(run)
            level = mine[LOSS]
            losses = [m[LOSS] for m in ladder]
            clamped = min(max(level, min(losses)), max(losses))  # outside the ladder: its nearest end, flagged
            if abs(clamped - level) > tol:
                flagged.append(seed)
            for key, v in mine.items():
                ref_v = interpolate([(m[LOSS], m[key]) for m in ladder if key in m], clamped)
                values.setdefault(key, []).append(v)
                deltas.setdefault(key, []).append(_diff(v, ref_v))
        out.append(
            Comparison(
                arm,
                {k: Estimate.of(v) for k, v in values.items()},
                {k: Estimate.of(v) for k, v in deltas.items()},
                flagged,
                notes,
            )
        )
    if len(ladder_budgets) < 2:
        for c in out:
            c.notes.append(
                f"the reference arm {reference!r} has only budget(s) {ladder_budgets}: add budgets "
                "(e.g. [0.75, 1.0, 1.25, 1.5]) to match losses across schedules"
            )
    return out


def matched_along_trajectory(
    results: list[dict[str, Any]], reference: str
) -> tuple[list[Comparison], dict[int, float]]:
    arms = arms_in(results)
    per_arm = {arm: _by_seed(results, arm) for arm in arms}
    seeds = sorted(set.intersection(*(set(r) for r in per_arm.values()))) if per_arm else []
    levels = {}
    interpolated: dict[str, dict[int, dict[str, float]]] = {arm: {} for arm in arms}
    for seed in seeds:
        level = max(min(e[LOSS] for e in per_arm[arm][seed]["evals"] if LOSS in e) for arm in arms)
        levels[seed] = level
        for arm in arms:
            evals = [e for e in per_arm[arm][seed]["evals"] if LOSS in e]
            eval_keys = {k for e in evals for k in e if k not in ("step",)}
            interpolated[arm][seed] = {
                k: v
                for k in eval_keys
                if (v := interpolate([(e[LOSS], e[k]) for e in evals if k in e], level)) is not None
            }
    out = []
    for arm in arms:
        mine = interpolated[arm]
        ref = interpolated[reference]
        keys = sorted({k for m in mine.values() for k in m})
        out.append(
            Comparison(
                arm,
                {k: Estimate.of([m.get(k) for m in mine.values()]) for k in keys},
                {k: Estimate.of([_diff(mine[s].get(k), ref[s].get(k)) for s in seeds]) for k in keys},
            )
        )
    return out, levels


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def analyse(results: list[dict[str, Any]], reference: str, tol: float) -> dict[str, Any]:
    """Everything the report shows, as plain data (also written to ``summary.json``)."""
    if not any(r["arm"] == reference and r["budget"] == 1.0 for r in results):
        raise ValueError(f"no finished run of the reference arm {reference!r} at budget 1.0: nothing to compare with")
    trajectory, levels = matched_along_trajectory(results, reference)
    return {
        "reference": reference,
        "tolerance": tol,
        "seeds": sorted({r["seed"] for r in results}),
        "equal_steps": equal_steps(results, reference, tol),
        "matched_own_schedules": matched_own_schedules(results, reference, tol),
        "matched_trajectory": trajectory,
        "trajectory_levels": levels,
    }
