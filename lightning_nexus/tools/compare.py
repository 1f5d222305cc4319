"""``lightning-nexus compare RUN_DIR [RUN_DIR ...] [--out DIR]``: compare finished runs from their
TensorBoard logs (no re-training): a loss table, PNG plots and a Markdown report.

Nexus claims the *same* pretraining loss as AdamW with better out-of-distribution loss, so besides final
and best values the table reports every run at a **matched train loss** L*: the highest train loss that
every run reached at one of its evaluations. Each run's validation losses are interpolated linearly in
train loss between the two evaluations that bracket L*, and the step at which the run's train loss
first reached L* is shown (fewer steps = faster). Train loss is smoothed (trailing mean of
``SMOOTH`` logged points) before it is compared, because per-step train loss is noisy.

A RUN_DIR is a directory holding event files (``runs/quickstart/version_0``) or a parent of several
(``runs/quickstart``: each version is a run).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lightning_nexus.tools.plotting import pyplot, save

SMOOTH = 5
"""Logged train-loss points in the trailing mean used for "best" and matched-loss comparisons."""


@dataclass
class Run:
    name: str
    path: Path
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def series(self, tag: str) -> list[tuple[int, float]]:
        return self.scalars.get(tag, [])

    def last(self, tag: str) -> float | None:
        s = self.series(tag)
        return s[-1][1] if s else None

    @property
    def val_sources(self) -> list[str]:
        return sorted(t[len("val/loss/") :] for t in self.scalars if t.startswith("val/loss/") and t != "val/loss/ood")

    @property
    def train_sources(self) -> list[str]:
        return sorted(t[len("train/loss/") :] for t in self.scalars if t.startswith("train/loss/"))


class RunError(Exception):
    """A RUN_DIR that cannot be compared; the message says why and what to pass instead."""


def find_runs(run_dir: str | Path) -> list[Path]:
    """Directories under ``run_dir`` (itself included) that contain TensorBoard event files."""
    root = Path(run_dir)
    if not root.is_dir():
        raise RunError(f"{root}: not a directory. Pass a TensorBoard log directory such as runs/quickstart/version_0.")
    dirs = sorted({p.parent for p in root.rglob("events.out.tfevents.*")})
    if not dirs:
        raise RunError(
            f"{root}: no TensorBoard event files (events.out.tfevents.*) found. Pass the logger's directory, "
            "e.g. runs/quickstart (printed at the end of training as 'TensorBoard logs: ...')."
        )
    return dirs


def load_run(path: Path, name: str) -> Run:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={SCALARS: 0})  # 0 = keep every point
    acc.Reload()
    run = Run(name, path)
    for tag in acc.Tags().get("scalars", []):
        points: dict[int, float] = {}
        for event in acc.Scalars(tag):
            points[event.step] = event.value  # a resumed run may rewrite steps: keep the newest
        run.scalars[tag] = sorted(points.items())
    if not run.series("train/loss"):
        raise RunError(
            f"{path}: no 'train/loss' scalars (tags found: {', '.join(sorted(run.scalars)) or 'none'}). "
            "compare needs runs logged by lightning_nexus_recipes.CausalLMModule or a module that logs the same tags."
        )
    return run


def load_runs(run_dirs: list[str]) -> tuple[list[Run], list[str]]:
    """All loadable runs and one message per RUN_DIR (or event directory) that could not be read."""
    runs, problems = [], []
    for run_dir in run_dirs:
        try:
            paths = find_runs(run_dir)
        except RunError as err:
            problems.append(str(err))
            continue
        for path in paths:
            name = str(path) if len(paths) == 1 else f"{run_dir.rstrip('/')}/{path.relative_to(run_dir)}"
            try:
                runs.append(load_run(path, _short_name(name)))
            except RunError as err:
                problems.append(str(err))
            except Exception as err:  # a corrupt event file must not hide the other runs
                problems.append(f"{path}: cannot read the event files ({type(err).__name__}: {err}).")
    return runs, problems


def _short_name(path: str) -> str:
    parts = Path(path).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else path


# ---------------------------------------------------------------------- numbers
def smoothed(points: list[tuple[int, float]], window: int = SMOOTH) -> list[tuple[int, float]]:
    out = []
    for i, (step, _) in enumerate(points):
        chunk = [v for _, v in points[max(0, i - window + 1) : i + 1]]
        out.append((step, sum(chunk) / len(chunk)))
    return out


def value_at(points: list[tuple[int, float]], step: int) -> float | None:
    """The last point at or before ``step`` (train loss is logged every few steps; evaluations are sparse)."""
    before = [v for s, v in points if s <= step]
    return before[-1] if before else None


def first_step_reaching(points: list[tuple[int, float]], level: float) -> float | None:
    """Step, interpolated linearly, at which a decreasing curve first reaches ``level``."""
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if v0 <= level:
            return float(s0)
        if v1 <= level:
            return s0 + (s1 - s0) * (v0 - level) / (v0 - v1)
    if points and points[-1][1] <= level:
        return float(points[-1][0])
    return None


def eval_points(run: Run, tag: str) -> list[tuple[float, float]]:
    """(smoothed train loss at the evaluation step, value of ``tag``) for each evaluation."""
    train = smoothed(run.series("train/loss"))
    out = []
    for step, value in run.series(tag):
        t = value_at(train, step)
        if t is not None:
            out.append((t, value))
    return out


def interpolate_at_train_loss(points: list[tuple[float, float]], level: float) -> float | None:
    """Linear interpolation of the evaluation curve at train loss ``level``; None outside its range."""
    for (t0, v0), (t1, v1) in zip(points, points[1:]):
        lo, hi = min(t0, t1), max(t0, t1)
        if lo <= level <= hi:
            return v0 if t0 == t1 else v0 + (v1 - v0) * (level - t0) / (t1 - t0)
    for t, v in points:
        if math.isclose(t, level, rel_tol=1e-9, abs_tol=1e-12):
            return v
    return None


def matched_train_loss(runs: list[Run]) -> float | None:
    """Highest (smoothed) train loss that every run reached at one of its evaluations."""
    levels = []
    for run in runs:
        points = eval_points(run, "val/loss") or eval_points(run, "val/loss/ood")
        if not points:
            return None
        levels.append(min(t for t, _ in points))
    return max(levels) if levels else None


@dataclass
class Table:
    columns: list[str]
    rows: list[tuple[str, list[str]]]

    def text(self) -> str:
        width = max(len(r[0]) for r in self.rows)
        colw = [max(len(c), *(len(r[1][i]) for r in self.rows)) for i, c in enumerate(self.columns)]
        lines = ["  ".join([" " * width] + [c.rjust(w) for c, w in zip(self.columns, colw)])]
        for label, cells in self.rows:
            lines.append("  ".join([label.ljust(width)] + [c.rjust(w) for c, w in zip(cells, colw)]))
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = ["| metric | " + " | ".join(self.columns) + " |", "|---" * (len(self.columns) + 1) + "|"]
        lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in self.rows]
        return "\n".join(lines)


def _fmt(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def build_table(runs: list[Run]) -> tuple[Table, float | None]:
    sources = sorted({s for r in runs for s in r.val_sources})
    rows: list[tuple[str, list[str]]] = []
    rows.append(("steps logged (last)", [str(r.series("train/loss")[-1][0]) for r in runs]))
    rows.append(("train loss (final, smoothed)", [_fmt(smoothed(r.series("train/loss"))[-1][1]) for r in runs]))
    rows.append(
        ("train loss (best, smoothed)", [_fmt(min(v for _, v in smoothed(r.series("train/loss")))) for r in runs])
    )
    for source in sources:
        rows.append((f"val/loss/{source} (final)", [_fmt(r.last(f"val/loss/{source}")) for r in runs]))
    rows.append(("val/loss in-dist mean (final)", [_fmt(r.last("val/loss")) for r in runs]))
    rows.append(("val/loss/ood (final)", [_fmt(r.last("val/loss/ood")) for r in runs]))
    rows.append(
        ("val/loss/ood (best)", [_fmt(min((v for _, v in r.series("val/loss/ood")), default=None)) for r in runs])
    )
    rows.append(
        ("grad cosine mean (last 10 logs)", [_fmt(_tail_mean(r.series("nexus/grad_cosine/mean"), 10)) for r in runs])
    )
    level = matched_train_loss(runs)
    if level is not None:
        tag = f"@ train loss {level:.4f}"
        steps = [first_step_reaching(smoothed(r.series("train/loss")), level) for r in runs]
        rows.append((f"{tag}: step reached", [_fmt(s, 0) for s in steps]))
        for source in sources:
            rows.append(
                (
                    f"{tag}: val/loss/{source}",
                    [_fmt(interpolate_at_train_loss(eval_points(r, f"val/loss/{source}"), level)) for r in runs],
                )
            )
        for t, label in (("val/loss", "in-dist mean"), ("val/loss/ood", "val/loss/ood")):
            rows.append((f"{tag}: {label}", [_fmt(interpolate_at_train_loss(eval_points(r, t), level)) for r in runs]))
    return Table([r.name for r in runs], rows), level


def _tail_mean(points: list[tuple[int, float]], n: int) -> float | None:
    values = [v for _, v in points[-n:] if math.isfinite(v)]
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------- plots


def plot_loss_curves(runs: list[Run], path: Path) -> bool:
    plt = pyplot()
    tags = ["train/loss"] + [f"train/loss/{s}" for s in sorted({s for r in runs for s in r.train_sources})]
    cols = min(3, len(tags))
    rows = math.ceil(len(tags) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, tag in zip(axes.flat, tags):
        for i, run in enumerate(runs):
            points = smoothed(run.series(tag))
            if points:
                ax.plot(*zip(*points), color=f"C{i}", label=run.name, lw=1.4)
            for step, v in run.series(tag.replace("train/", "val/", 1)):
                ax.plot(step, v, "o", color=f"C{i}", ms=4)
        ax.set_title(tag + "  (dots: val)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(tags) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return save(fig, path, dpi=80)


def plot_ood_vs_train(runs: list[Run], path: Path, level: float | None) -> bool:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    drew = False
    for ax, tag in zip(axes, ("val/loss/ood", "val/loss")):
        for i, run in enumerate(runs):
            points = eval_points(run, tag)
            if points:
                ax.plot(*zip(*points), "o-", color=f"C{i}", label=run.name, ms=4)
                drew = True
        if level is not None:
            ax.axvline(level, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("train loss (smoothed)", fontsize=8)
        ax.set_ylabel(tag, fontsize=8)
        ax.invert_xaxis()  # training proceeds to the right
        ax.tick_params(labelsize=7)
    axes[0].set_title("OOD val loss vs train loss (lower right = better)", fontsize=9)
    axes[1].set_title("in-distribution val loss vs train loss", fontsize=9)
    axes[0].legend(fontsize=7)
    if not drew:
        plt.close(fig)
        return False
    return save(fig, path, dpi=80)


def plot_grad_cosine(runs: list[Run], path: Path) -> bool:
    plt = pyplot()
    with_cos = [(i, r) for i, r in enumerate(runs) if r.series("nexus/grad_cosine/mean")]
    if not with_cos:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    styles = ["-", "--", ":", "-."]
    for i, run in with_cos:
        axes[0].plot(*zip(*run.series("nexus/grad_cosine/mean")), color=f"C{i}", label=run.name, lw=1.4)
        pairs = sorted(t for t in run.scalars if t.startswith("nexus/grad_cosine/") and t != "nexus/grad_cosine/mean")
        for j, tag in enumerate(pairs):
            axes[1].plot(
                *zip(*run.series(tag)),
                color=f"C{j}",
                ls=styles[i % len(styles)],
                lw=0.9,
                label=f"{tag.rsplit('/', 1)[1]} ({run.name})",
            )
    for ax, title in zip(axes, ("mean gradient cosine between micro-batches", "per source pair")):
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=5, ncol=2)
    return save(fig, path, dpi=80)


# ---------------------------------------------------------------------- entry point
def compare(run_dirs: list[str], out: str | Path | None = None) -> int:
    """Print the table, write the plots and ``report.md`` into ``out``; return a process exit code."""
    runs, problems = load_runs(run_dirs)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    if not runs:
        print("error: no run could be read; nothing to compare.", file=sys.stderr)
        return 2
    table, level = build_table(runs)
    print(table.text())
    if level is None:
        print("(no matched-loss rows: a run has no val/loss evaluations)")
    out_dir = Path(out) if out is not None else Path("compare_report")
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "loss_curves.png": ("Loss curves per source", plot_loss_curves(runs, out_dir / "loss_curves.png")),
        "ood_vs_train.png": (
            "OOD and in-distribution val loss against train loss",
            plot_ood_vs_train(runs, out_dir / "ood_vs_train.png", level),
        ),
        "grad_cosine.png": (
            "Gradient cosine between micro-batches",
            plot_grad_cosine(runs, out_dir / "grad_cosine.png"),
        ),
    }
    missing = [name for name, (_, made) in plots.items() if not made]
    if "grad_cosine.png" in missing:
        print(
            "note: no run logged nexus/grad_cosine/* (add lightning_nexus.monitor.GradSimilarityMonitor); "
            "grad_cosine.png not written",
            file=sys.stderr,
        )
    _write_markdown(out_dir / "report.md", runs, table, level, plots, problems)
    print(f"report: {out_dir / 'report.md'}")
    return 0


def _write_markdown(
    path: Path, runs: list[Run], table: Table, level: float | None, plots: dict, problems: list[str]
) -> None:
    lines = ["# Run comparison", "", "Runs:", ""]
    lines += [f"- `{r.name}`: `{r.path}`" for r in runs]
    lines += ["", table.markdown(), ""]
    if level is not None:
        lines.append(
            f"Rows marked `@ train loss {level:.4f}` compare the runs at the highest smoothed train loss that every "
            "run reached at an evaluation (validation losses interpolated in train loss between the two bracketing "
            "evaluations; `n/a` where a run's evaluations do not bracket it). At equal train loss, lower OOD loss "
            "means a solution shared better by the sources."
        )
        lines.append("")
    for name, (title, made) in plots.items():
        if made:
            lines += [f"## {title}", "", f"![{title}]({name})", ""]
    if problems:
        lines += ["## Not compared", ""] + [f"- {p}" for p in problems] + [""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-nexus compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="TensorBoard log directory of a run")
    parser.add_argument("--out", default="compare_report", help="where to write the PNGs and report.md")
    args = parser.parse_args(argv)
    raise SystemExit(compare(args.run_dirs, args.out))


if __name__ == "__main__":
    main()
