"""The experiment's Markdown report, PNG plots and ``summary.json``, from the finished runs only."""

from __future__ import annotations

import json
import math
import os
import platform
from datetime import date
from pathlib import Path
from statistics import mean
from typing import Any

from lightning_nexus.tools.experiment.analysis import LOSS, Comparison, Estimate, analyse, arms_in
from lightning_nexus.tools.experiment.provenance import versions_in
from lightning_nexus.tools.plotting import pyplot, save

HEADLINE = [LOSS, "val/loss/ood"]
"""Columns of the main tables, before the probes (``probe/*``)."""
HEADLINE_METRICS = (
    "val/loss/ood",
    "probe/",
    "diag/transfer/mean",
    "diag/hessian_trace/all",
    "diag/finetune/spread_ratio",
)
"""Metrics (prefixes) the headline states for every arm, where the runs have them."""
DIAGNOSTICS = ("diag/", "grad_cosine/", "val/grad_cosine/", "steps_to_optimum")
"""Metrics (prefixes) of the diagnostics tables."""
NO_LADDER = "Not available: the reference arm was trained at one budget only (see Problems)."
COSINES_NOTE = (
    "`grad_cosine/end` is the training-time monitor (`nexus/grad_cosine/mean`, last fifth of training): under Nexus it "
    "takes each micro-batch's gradient at a different inner point, under AdamW at the window's start, on different "
    "random batches, so arms are not compared like for like. `val/grad_cosine/*` and `diag/grad_alignment/*` (where "
    "present) are like for like: every arm's gradients of the same fixed validation batches at its own current "
    "weights; `cross` is between sources, `within` between batches of one source (the noise floor)."
)


def _fmt(e: Estimate | None, digits: int = 4) -> str:
    if e is None:
        return "–"
    ci = f" ± {e.ci:.{digits}f}" if math.isfinite(e.ci) else ""
    return f"{e.mean:+.{digits}f}{ci}" if digits else f"{e.mean:+.0f}{ci}"


def _value(e: Estimate | None, digits: int = 4) -> str:
    return "–" if e is None else f"{e.mean:.{digits}f}"


def _columns(comparisons: list[Comparison], prefixes: tuple[str, ...]) -> list[str]:
    keys = sorted({k for c in comparisons for k in c.values if k.startswith(prefixes)})
    return [k for k in HEADLINE if k in keys] + [k for k in keys if k not in HEADLINE]


def comparison_table(
    comparisons: list[Comparison], reference: str, prefixes: tuple[str, ...] = ("val/loss", "probe/")
) -> str:
    """Markdown: one row per arm, ``value (Δ ± CI)`` per metric; Δ in bold where the 95% CI excludes 0."""
    cols = _columns(comparisons, prefixes)
    cols = [c for c in cols if c == LOSS or c == "val/loss/ood" or not c.startswith("val/loss/")] or cols
    lines = ["| arm | " + " | ".join(cols) + " | loss not matched (seeds) |", "|---" * (len(cols) + 2) + "|"]
    for c in comparisons:
        cells = []
        for col in cols:
            v, d = c.values.get(col), c.deltas.get(col)
            if c.arm == reference or d is None:
                cells.append(_value(v))
            else:
                delta = _fmt(d)
                cells.append(f"{_value(v)} ({'**' + delta + '**' if d.excludes_zero else delta})")
        flag = ", ".join(map(str, c.flagged_seeds)) if c.flagged_seeds else ""
        lines.append(f"| {c.arm}{' (reference)' if c.arm == reference else ''} | " + " | ".join(cells) + f" | {flag} |")
    return "\n".join(lines)


def headline(summary: dict[str, Any], table: str = "matched_own_schedules") -> list[str]:
    """One sentence per arm and metric of one comparison (default: matched loss, own schedules), as measured."""
    lines = []
    for c in summary[table]:
        if c.arm == summary["reference"]:
            continue
        parts = []
        for key in _columns([c], HEADLINE_METRICS):
            d = c.deltas.get(key)
            if d is None:
                continue
            if not math.isfinite(d.ci):
                verdict = "one seed: no confidence interval"
            elif d.excludes_zero and key.startswith("diag/"):
                verdict = "lower" if d.mean < 0 else "higher"  # no better/worse: a diagnostic, not a score
            elif d.excludes_zero:
                verdict = "better" if (d.mean < 0) == key.startswith("val/") else "worse"
            else:
                verdict = "no significant difference"
            parts.append(f"{key} {_fmt(d)} ({verdict})")
        flag = f"; loss not matched within tolerance for seed(s) {c.flagged_seeds}" if c.flagged_seeds else ""
        if parts:
            lines.append(f"- **{c.arm}** vs {summary['reference']}: " + "; ".join(parts) + flag)
    return lines


def write_report(
    results: list[dict[str, Any]],
    out_dir: Path,
    reference: str,
    tol: float,
    command: str = "",
    failures: list[str] | None = None,
) -> Path:
    summary = analyse(results, reference, tol)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "ood_vs_loss.png": plot_ood_vs_loss(results, reference, out_dir / "ood_vs_loss.png"),
        "probes.png": plot_bars(summary["equal_steps"], ("probe/",), "accuracy", out_dir / "probes.png"),
        "diagnostics.png": plot_bars(summary["equal_steps"], ("diag/",), "value", out_dir / "diagnostics.png"),
        "grad_cosine.png": plot_grad_cosine(results, out_dir / "grad_cosine.png"),
        "grad_alignment.png": plot_grad_alignment(results, out_dir / "grad_alignment.png"),
    }
    # Without a reference ladder there is no loss-matched headline; at a known optimum (every arm converged,
    # the loss flags empty) equal steps *is* equal loss, so the headline states that comparison instead.
    own = headline(summary)
    fallback = [] if own else headline(summary, "equal_steps")
    seeds = summary["seeds"]
    wall = sum(r["wall_s"] for r in results)
    import torch

    lines = [
        "# Evidence: does Nexus give the same loss with better OOD/downstream results?",
        "",
        f"- command: `{command}`" if command else "",
        f"- date: {date.today().isoformat()}; machine: {platform.processor() or platform.machine()}, "
        f"{_device()}; torch {torch.__version__}",
        f"- {len(results)} finished runs, arms {arms_in(results)}, seeds {seeds}; training wall time summed over runs "
        f"{wall / 60:.1f} min",
        *code_lines(results),
        f"- reference arm: `{reference}`; Δ = arm − reference per seed, mean ± 95% CI over seeds (Student t); "
        f"**bold** where the CI excludes 0. Loss tolerance for matching: {tol}.",
        "",
        "## Headline (matched in-distribution loss, each run completing its own schedule)"
        if own or not fallback
        else f"## Headline (equal steps; the loss is matched where no seed is flagged as differing by more than {tol})",
        "",
        *(own or fallback or ["- not available: the reference arm needs at least two budgets per seed (see Problems)"]),
        "",
        "## 1. Matched loss, own schedules",
        "",
        "Each arm's final values against the reference's budget ladder interpolated at the arm's final "
        f"`{LOSS}`. A seed is listed when the arm's loss lies outside the ladder's range by more than {tol}.",
        "",
        comparison_table(summary["matched_own_schedules"], reference) if own else NO_LADDER,
        "",
        "## 2. Equal steps",
        "",
        f"Final values after the same number of optimizer steps. A seed is listed when `{LOSS}` differs from "
        f"the reference by more than {tol}: then the other differences may only reflect more or less training.",
        "",
        comparison_table(summary["equal_steps"], reference),
        "",
        "## 3. Matched loss along the trajectory (schedule-confounded)",
        "",
        "Every arm interpolated between its evaluations at the highest in-distribution loss all arms of a seed "
        "reached (per seed: " + ", ".join(f"{s}: {v:.4f}" for s, v in summary["trajectory_levels"].items()) + ").",
        "",
        comparison_table(summary["matched_trajectory"], reference),
        "",
        "## 4. Common-minima diagnostics (end of training)",
        "",
        "At matched loss (own schedules, as in section 1): the reference ladder's diagnostics interpolated at "
        "each arm's final loss, so that a difference is not just more or less training.",
        "",
        comparison_table(summary["matched_own_schedules"], reference, prefixes=DIAGNOSTICS) if own else NO_LADDER,
        "",
        "At equal steps:",
        "",
        comparison_table(summary["equal_steps"], reference, prefixes=DIAGNOSTICS),
        "",
        COSINES_NOTE,
        "",
        "## Plots",
        "",
        *[f"![{name}]({name})" for name, ok in plots.items() if ok],
    ]
    notes = [n for c in summary["matched_own_schedules"] for n in c.notes] + void_finetunes(results)
    if notes or failures:
        lines += ["", "## Problems", ""] + [f"- {n}" for n in sorted(set(notes))]
        lines += [f"- run failed: {f.splitlines()[0]}" for f in failures or []]
    path = out_dir / "report.md"
    path.write_text("\n".join(line for line in lines if line is not None) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(_jsonable(summary), indent=1))
    return path


def code_lines(results: list[dict[str, Any]]) -> list[str]:
    """The code the runs were trained on; a warning naming each version when there is more than one."""
    groups = versions_in(results)
    if len(groups) == 1:
        return [f"- trained on: {next(iter(groups))} (every run)"]
    return [
        f"- **warning: the runs were trained on {len(groups)} different versions of the code or libraries**, so "
        "a difference between arms may be a difference between versions. Retrain the runs of the older versions "
        "(delete their run directories and rerun the command) before reading the comparison:",
        *(
            f"  - {version}: {len(runs)} run(s): " + ", ".join(runs[:8]) + (" ..." if len(runs) > 8 else "")
            for version, runs in groups.items()
        ),
    ]


def void_finetunes(results: list[dict[str, Any]]) -> list[str]:
    """Runs whose per-source fine-tunes *raised* the loss on average: the step overshot, so their
    fine-tune distances describe the overshoot, not the landscape around the trained model."""
    bad: dict[str, list[int]] = {}
    for r in results:
        drop = r.get("evidence", {}).get("diagnostics", {}).get("finetune", {}).get("mean_loss_drop")
        if drop is not None and not drop > 0:
            bad.setdefault(r["label"], []).append(r["seed"])
    return [
        f"{label}: the fine-tune diagnostic raised the loss (seeds {sorted(seeds)}), so its distances are void; "
        "lower the EvidenceCallback's finetune_lr"
        for label, seeds in sorted(bad.items())
    ]


def _device() -> str:
    import torch

    # cores, not torch's thread count: the runs set their own (cores / workers), this process may differ
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def _jsonable(summary: dict[str, Any]) -> dict[str, Any]:
    out = dict(summary)
    for key in ("equal_steps", "matched_own_schedules", "matched_trajectory"):
        out[key] = [c.to_dict() for c in summary[key]]
    out["trajectory_levels"] = {str(k): v for k, v in summary["trajectory_levels"].items()}
    return out


# ------------------------------------------------------------------------------------- plots
def plot_ood_vs_loss(results: list[dict[str, Any]], reference: str, path: Path) -> bool:
    """OOD loss against in-distribution loss at every evaluation, per arm; the reference's budget ends as dots."""
    if not any("val/loss/ood" in e for r in results for e in r["evals"]):
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = {arm: f"C{i % 10}" for i, arm in enumerate(arms_in(results))}
    for arm in arms_in(results):
        for i, r in enumerate(x for x in results if x["arm"] == arm and x["budget"] == 1.0):
            pts = [(e[LOSS], e["val/loss/ood"]) for e in r["evals"] if LOSS in e and "val/loss/ood" in e]
            ax.plot(*zip(*pts), color=colors[arm], alpha=0.5, lw=1, label=arm if i == 0 else None)
    ends = [
        (r["final"][LOSS], r["final"]["val/loss/ood"])
        for r in results
        if r["arm"] == reference and "val/loss/ood" in r["final"]
    ]
    if ends:
        ax.scatter(*zip(*ends), color=colors[reference], marker="o", s=18, label=f"{reference}: end of each budget")
    ax.set_xlabel("in-distribution val loss")
    ax.set_ylabel("OOD val loss")
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    ax.set_title("OOD vs in-distribution loss (all seeds)")
    return save(fig, path, dpi=110)


def plot_bars(comparisons: list[Comparison], prefixes: tuple[str, ...], ylabel: str, path: Path) -> bool:
    keys = sorted({k for c in comparisons for k in c.values if k.startswith(prefixes)})
    if not keys:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        present = [(c.arm, v) for c in comparisons if (v := c.values.get(key)) is not None]
        arms = [arm for arm, _ in present]
        vals = [v for _, v in present]
        ax.bar(
            range(len(arms)),
            [v.mean for v in vals],
            yerr=[v.ci if math.isfinite(v.ci) else 0 for v in vals],
            color=[f"C{i % 10}" for i in range(len(arms))],
            capsize=3,
        )
        ax.set_xticks(range(len(arms)), arms, rotation=60, ha="right", fontsize=7)
        ax.set_title(key, fontsize=8)
        ax.set_ylabel(ylabel)
    fig.tight_layout()
    return save(fig, path, dpi=110)


def plot_grad_cosine(results: list[dict[str, Any]], path: Path) -> bool:
    series = [r for r in results if r["budget"] == 1.0 and r.get("series", {}).get("nexus/grad_cosine/mean")]
    if not series:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, arm in enumerate(arms_in(series)):
        runs = [r["series"]["nexus/grad_cosine/mean"] for r in series if r["arm"] == arm]
        steps = sorted(set.intersection(*(set(s for s, _ in run) for run in runs)))
        avg = [mean(dict(run)[s] for run in runs) for s in steps]
        ax.plot(steps, avg, color=f"C{i % 10}", label=arm)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("mean cross-source gradient cosine")
    ax.legend(fontsize=7)
    return save(fig, path, dpi=110)


def plot_grad_alignment(results: list[dict[str, Any]], path: Path) -> bool:
    """The like-for-like cosines at every evaluation, mean over seeds: cross-source (solid) and the
    within-source noise floor (dashed), per arm."""
    tags = ("val/grad_cosine/cross", "val/grad_cosine/within")
    runs = [r for r in results if r["budget"] == 1.0 and any(tags[0] in e for e in r["evals"])]
    if not runs:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, arm in enumerate(arms_in(runs)):
        for tag, style in zip(tags, ("-", "--")):
            points: dict[int, list[float]] = {}
            for r in (x for x in runs if x["arm"] == arm):
                for e in r["evals"]:
                    if tag in e:
                        points.setdefault(e["step"], []).append(e[tag])
            steps = sorted(points)
            label = f"{arm} ({tag.rsplit('/', 1)[1]})"
            ax.plot(steps, [mean(points[s]) for s in steps], style, color=f"C{i % 10}", label=label)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("gradient cosine at the same weights (fixed batches)")
    ax.legend(fontsize=6, ncol=2)
    return save(fig, path, dpi=110)
