"""Run every (arm, budget, seed) of an experiment as its own ``lightning-nexus fit`` process, resumably.

Layout under ``out_dir``::

    runs/<arm>[@<budget>x]/seed<k>/config.yaml   the complete fit config of the run
                                  /fit.log       its stdout and stderr
                                  /tb/           TensorBoard events (+ evidence.json from EvidenceCallback)
                                  /result.json   written last: the run is finished
    report.md, *.png, summary.json               written by the analysis after all runs

A run counts as finished only when ``result.json`` exists, so an interrupted experiment re-runs the run
that was cut off (from scratch: runs are minutes long) and never retrains a finished one. A failing run
is recorded in its ``fit.log`` and the others go on; the command exits non-zero at the end.

Runs are separate processes rather than calls in one interpreter: seeded global state (RNGs, thread
pools, Lightning's process-level caches) cannot leak from one arm into the next, and with
``workers > 1`` runs of a tiny model use the cores better than one run with all threads.

Nothing outlives the runner: each fit runs under ``supervise.py`` in its own process group, which is
stopped when the runner receives SIGTERM/SIGINT (forwarded) or dies, even by SIGKILL (parent-death
signal). A lock file (``fcntl.flock`` on ``out_dir/.runner.lock``, released by the kernel when the runner
dies) refuses a second runner on the same output directory, which would otherwise retrain, and delete,
the runs the first one is writing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import yaml

from lightning_nexus.tools.compare import RunError, load_run
from lightning_nexus.tools.experiment.config import ExperimentConfig, RunSpec
from lightning_nexus.tools.experiment.provenance import describe, provenance, source_fingerprint

RESULT_FILE = "result.json"
FAIL_FAST = 3
"""Runs that must fail, with none succeeding, before the rest are not started."""
EVIDENCE_FILE = "evidence.json"


def run_dir(cfg: ExperimentConfig, run: RunSpec) -> Path:
    return cfg.out_dir / "runs" / run.label / f"seed{run.seed}"


def is_finished(cfg: ExperimentConfig, run: RunSpec) -> bool:
    return (run_dir(cfg, run) / RESULT_FILE).is_file()


class StaleRunError(ValueError):
    """Finished runs in the output directory were trained with a config the experiment file no longer gives."""


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths at which two plain-data configs differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for k in dict.fromkeys([*old, *new])
            for d in _differences(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")
        ]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{prefix}{i}.")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _without_logger(config: dict[str, Any]) -> dict[str, Any]:
    # the logger only says where the events go, and moves with the output directory
    return {**config, "trainer": {k: v for k, v in config.get("trainer", {}).items() if k != "logger"}}


def check_finished_runs(cfg: ExperimentConfig) -> None:
    """Refuse to mix results of different configs: resuming after the experiment file (or its base)
    changed would otherwise keep the old finished runs beside new ones, and the report would compare them."""
    stale = []
    for run in cfg.runs():
        if not is_finished(cfg, run):
            continue
        directory = run_dir(cfg, run)
        try:
            saved = yaml.safe_load((directory / "config.yaml").read_text())
        except (OSError, yaml.YAMLError) as err:
            stale.append(f"{directory}: its config.yaml cannot be read ({err})")
            continue
        diff = _differences(_without_logger(saved), _without_logger(fit_config(run, directory)))
        if diff:
            stale.append(
                f"{directory}: " + "; ".join(diff[:3]) + (f" (+{len(diff) - 3} more)" if len(diff) > 3 else "")
            )
    if stale:
        shown = "\n  ".join(stale[:8]) + (f"\n  ... and {len(stale) - 8} more" if len(stale) > 8 else "")
        raise StaleRunError(
            f"{len(stale)} finished run(s) under {cfg.out_dir} were trained with a different config than the "
            f"experiment file gives now (saved -> now):\n  {shown}\nNothing was changed. Pass a new --out to "
            "run the changed experiment beside the old one, or delete those run directories to retrain them."
        )


def warn_other_code(cfg: ExperimentConfig, log=print) -> None:
    """Name the finished runs trained on other code than the runs about to start. Not refused (an edit of a
    comment changes the fingerprint too), but said here and in the report, so that it is never silent."""
    now = describe({"provenance": provenance()})
    other = []
    for run in cfg.runs():
        if is_finished(cfg, run):
            was = describe(json.loads((run_dir(cfg, run) / RESULT_FILE).read_text()))
            if was != now:
                other.append(f"{run.key} ({was})")
    if other:
        shown = ", ".join(other[:6]) + (f" and {len(other) - 6} more" if len(other) > 6 else "")
        log(
            f"warning: {len(other)} finished run(s) were trained on other code than the runs starting now "
            f"({now}): {shown}. They are kept, and the report lists the versions; delete their run "
            "directories to retrain them on this code."
        )


def fit_config(run: RunSpec, directory: Path) -> dict[str, Any]:
    """The run's config with the runner's logger: events go to ``directory/tb``."""
    cfg = json.loads(json.dumps(run.config))  # deep copy, and proof the config is plain data
    trainer = cfg["trainer"]
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(directory), "name": "", "version": "tb", "default_hp_metric": False},
    }
    trainer.setdefault("enable_progress_bar", False)
    return cfg


def train_one(cfg: ExperimentConfig, run: RunSpec, threads: int) -> dict[str, Any]:
    """Train one run in a child process and write its ``result.json``; raises RuntimeError on failure."""
    directory = run_dir(cfg, run)
    if directory.exists():  # an interrupted attempt: its events would mix with the new ones
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    config_path = directory / "config.yaml"
    config_path.write_text(yaml.safe_dump(fit_config(run, directory), sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    trained_on = provenance()
    start = time.perf_counter()
    with open(directory / "fit.log", "w") as log:
        returncode = run_supervised(
            [sys.executable, "-m", "lightning_nexus", "fit", "--config", str(config_path)], stdout=log, env=env
        )
    wall = time.perf_counter() - start
    if returncode != 0:
        tail = (directory / "fit.log").read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(
            f"{run.key}: exit code {returncode} after {wall:.0f} s. Last lines of "
            f"{directory / 'fit.log'}:\n    " + "\n    ".join(tail)
        )
    result = collect_result(run, directory, wall)
    after = source_fingerprint()
    if after != trained_on["code"]:  # the child may have imported either version: a version of its own
        trained_on["code"] = f"{trained_on['code']}->{after} (changed during the run)"
    result["provenance"] = trained_on
    tmp = directory / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.rename(directory / RESULT_FILE)  # atomic: a half-written result never marks a run finished
    return result


def collect_result(run: RunSpec, directory: Path, wall_s: float) -> dict[str, Any]:
    """Evaluation points, final values and the EvidenceCallback's diagnostics of a finished run."""
    try:
        scalars = load_run(directory / "tb", run.key).scalars
    except RunError as err:
        raise RuntimeError(f"{run.key}: the run finished but its logs cannot be read: {err}") from err
    series = {tag: dict(points) for tag, points in sorted(scalars.items()) if tag.startswith(("val/", "probe/"))}
    steps = sorted({s for points in series.values() for s in points})
    evals = [{"step": s, **{tag: points[s] for tag, points in series.items() if s in points}} for s in steps]
    if not evals or "val/loss" not in evals[-1]:
        raise RuntimeError(
            f"{run.key}: no final 'val/loss' was logged; the base config must validate (val_check_interval) "
            "and the module must log val/loss"
        )
    evidence_path = directory / "tb" / EVIDENCE_FILE
    evidence = json.loads(evidence_path.read_text()) if evidence_path.is_file() else {}
    keep = ("train/loss", "nexus/grad_cosine/mean", "nexus/inner_to_outer_ratio")
    return {
        "arm": run.arm,
        "budget": run.budget,
        "seed": run.seed,
        "label": run.label,
        "max_steps": run.config["trainer"]["max_steps"],
        "wall_s": round(wall_s, 1),
        "evals": evals,
        "final": evals[-1],
        "evidence": evidence,
        "series": {tag: scalars[tag] for tag in keep if tag in scalars},
    }


def prepare_data(cfg: ExperimentConfig) -> None:
    """Build the data caches once, before parallel runs could race to build them."""
    first = cfg.runs()[0]
    if not isinstance(first.config.get("data"), dict):
        return
    directory = cfg.out_dir / "prepare"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(fit_config(first, directory), sort_keys=False))
    code = (
        "import sys; from lightning_nexus.tools.cli import NexusCLI; "
        "cli = NexusCLI(args=['--config', sys.argv[1]], run=False); cli.datamodule.prepare_data()"
    )
    with open(directory / "prepare.log", "w+") as log:
        returncode = run_supervised([sys.executable, "-c", code, str(path)], stdout=log)
        log.seek(0)
        output = log.read()
    if returncode != 0:
        raise RuntimeError("preparing the data failed (no run was started):\n" + output[-3000:])
    shutil.rmtree(directory, ignore_errors=True)


def run_experiment(cfg: ExperimentConfig, log=print) -> list[str]:
    """Train every unfinished run; returns one message per failed run (empty if all finished).
    Raises :class:`StaleRunError` before training anything if a finished run's config has changed."""
    check_finished_runs(cfg)
    runs = cfg.runs()
    todo = [r for r in runs if not is_finished(cfg, r)]
    log(
        f"experiment: {len(runs)} runs ({len(cfg.arms)} arms and their budgets x {len(cfg.seeds)} seeds); "
        f"{len(runs) - len(todo)} already finished, {len(todo)} to train with {cfg.workers} worker(s) -> {cfg.out_dir}"
    )
    if not todo:
        return []
    if len(todo) < len(runs):
        warn_other_code(cfg, log)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    with runner_lock(cfg.out_dir), forward_stop_signals():
        return _train_all(cfg, runs, todo, log)


def _train_all(cfg: ExperimentConfig, runs: list[RunSpec], todo: list[RunSpec], log) -> list[str]:
    shutil.rmtree(cfg.out_dir / "prepare", ignore_errors=True)  # left by a runner that was killed
    prepare_data(cfg)
    threads = max(1, (os.cpu_count() or 1) // cfg.workers)
    failures: list[str] = []
    lock = threading.Lock()
    done = [len(runs) - len(todo)]

    succeeded = [0]

    def one(run: RunSpec) -> None:
        with lock:
            # the same error in every run (a broken install or base config) should cost minutes, not hours
            if len(failures) >= FAIL_FAST and not succeeded[0]:
                failures.append(f"{run.key}: not started, the first {FAIL_FAST} runs all failed")
                return
        try:
            result = train_one(cfg, run, threads)
        except RuntimeError as err:
            with lock:
                failures.append(str(err))
                log(f"FAILED {err}")
            return
        with lock:
            succeeded[0] += 1
            done[0] += 1
            final = result["final"]
            ood = final.get("val/loss/ood")
            log(
                f"[{done[0]}/{len(runs)}] {run.key}: {result['wall_s']:.0f} s, val/loss {final['val/loss']:.4f}"
                + (f", ood {ood:.4f}" if ood is not None else "")
            )

    with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
        list(pool.map(one, todo))
    return failures


# ---------------------------------------------------------------------- children that die with the runner
_children: set[subprocess.Popen] = set()
_children_lock = threading.Lock()


def start_supervised(
    cmd: list[str], stdout: IO | int | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start ``cmd`` under ``supervise.py``: its own process group, stopped with the runner (see there)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightning_nexus.tools.experiment.supervise", str(os.getpid()), "--", *cmd],
        stdout=stdout,
        stderr=subprocess.STDOUT if stdout is not None else None,
        env=env,
        start_new_session=True,
    )
    with _children_lock:
        _children.add(proc)
    return proc


def run_supervised(cmd: list[str], stdout: IO | int | None = None, env: dict[str, str] | None = None) -> int:
    """``start_supervised`` and wait; returns the command's exit code."""
    proc = start_supervised(cmd, stdout, env)
    try:
        return proc.wait()
    finally:
        with _children_lock:
            _children.discard(proc)


def stop_children() -> None:
    """Ask every running supervisor to stop its process group (SIGTERM, then SIGKILL after its grace)."""
    with _children_lock:
        running = [p for p in _children if p.poll() is None]
    for proc in running:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass


@contextmanager
def forward_stop_signals() -> Iterator[None]:
    """While training, SIGTERM/SIGINT of the runner stop its children first, then end the runner as usual.
    Signal handlers can only be set from the main thread; elsewhere this does nothing (the parent-death
    signal still covers a runner that dies)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        stop_children()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class RunnerLockedError(RuntimeError):
    """Another experiment runner is using the output directory."""


@contextmanager
def runner_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir/.runner.lock`` (``fcntl.flock``) for the duration, or refuse: the kernel releases it when
    the holder dies, so a killed runner never leaves a stale lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover  (Windows: no flock; run one runner per directory yourself)
        yield
        return
    path = out_dir / ".runner.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise RunnerLockedError(
                f"another experiment runner ({holder}) is training into {out_dir}; a second one would retrain, "
                "and delete, the runs it is writing. Wait for it to finish (or stop it), or pass another --out."
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_results(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    return [json.loads((run_dir(cfg, r) / RESULT_FILE).read_text()) for r in cfg.runs() if is_finished(cfg, r)]
