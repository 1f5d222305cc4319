"""``lightning-nexus experiment --config recipes/evidence.yaml``: paired arms × seeds, resumable, with a report.

The experiment file names a base fit config and the arms that change it (see ``config.py``); the runner
trains each (arm, budget, seed) as its own ``lightning-nexus fit`` process (``runner.py``); the analysis
compares every arm with the reference at equal steps and at matched loss (``analysis.py``) and writes
``report.md`` with plots (``report.py``). Nothing here imports the recipes: models, data, probes and
diagnostics are named by ``class_path`` in the configs, as for ``lightning-nexus fit``.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from lightning_nexus.tools.experiment.config import ExperimentConfig, ExperimentConfigError, load_experiment
from lightning_nexus.tools.experiment.report import write_report
from lightning_nexus.tools.experiment.runner import (
    RunnerLockedError,
    StaleRunError,
    check_finished_runs,
    load_results,
    run_experiment,
)

__all__ = [
    "ExperimentConfig",
    "ExperimentConfigError",
    "StaleRunError",
    "load_experiment",
    "main",
    "run_experiment",
    "write_report",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-nexus experiment",
        description="Train every arm x seed of an experiment file (skipping finished runs), then write report.md.",
    )
    parser.add_argument("--config", required=True, help="experiment file, e.g. recipes/evidence.yaml")
    parser.add_argument("--out", default=None, help="output directory (default: out_dir from the file)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the file's seeds")
    parser.add_argument("--workers", type=int, default=None, help="runs trained at the same time")
    parser.add_argument(
        "--arms",
        nargs="+",
        default=None,
        metavar="NAME",
        help="train and report only these arms (must include the reference)",
    )
    parser.add_argument("--report-only", action="store_true", help="only (re)write the report from finished runs")
    args = parser.parse_args(argv)
    try:
        cfg = load_experiment(
            args.config, out_dir=args.out, seeds=args.seeds, workers=args.workers, only_arms=args.arms
        )
    except ExperimentConfigError as err:
        raise SystemExit(f"error: {err}") from None
    failures: list[str] = []
    try:
        if args.report_only:
            check_finished_runs(cfg)
        else:
            failures = run_experiment(cfg)
    except (StaleRunError, RunnerLockedError) as err:
        raise SystemExit(f"error: {err}") from None
    results = load_results(cfg)
    if not results:
        if failures:
            raise SystemExit(
                f"error: all {len(failures)} run(s) failed (see above); fix the config and rerun the same command"
            )
        raise SystemExit(f"error: no finished runs under {cfg.out_dir}/runs; run without --report-only first")
    # the report names the command that trains these runs: --report-only only rewrites it
    words = [a for a in (argv if argv is not None else sys.argv[2:]) if a != "--report-only"]
    command = "lightning-nexus experiment " + " ".join(shlex.quote(a) for a in words)
    try:
        path = write_report(results, cfg.out_dir, cfg.reference, cfg.loss_match_tolerance, command, failures)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"report: {path}")
    if failures:
        raise SystemExit(f"error: {len(failures)} run(s) failed (see above); rerun the same command to retry them")
