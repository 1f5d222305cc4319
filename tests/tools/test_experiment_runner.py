"""The runner's resume rule: finished runs are kept only while the experiment file still gives their config."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lightning_nexus.tools.experiment import main
from lightning_nexus.tools.experiment.config import load_experiment
from lightning_nexus.tools.experiment.runner import (
    RESULT_FILE,
    StaleRunError,
    check_finished_runs,
    fit_config,
    run_dir,
    run_experiment,
    runner_lock,
)

BASE = {
    "seed_everything": 0,
    "trainer": {
        "max_steps": 10,
        "accumulate_grad_batches": 4,
        "callbacks": [{"class_path": "E", "init_args": {"finetune_lr": 0.1}}],
    },
    "model": {"class_path": "M", "init_args": {"lr": 0.001}},
}
EXPERIMENT = {
    "base": "base.yaml",
    "seeds": [0],
    "reference": "adamw",
    "arms": [{"name": "adamw"}, {"name": "nexus", "callbacks": [{"class_path": "N"}]}],
}


def finish_all(tmp_path: Path, out: Path) -> None:
    """Mark every run finished the way train_one leaves it: its fit config, then result.json."""
    cfg = load_experiment(tmp_path / "exp.yaml", out_dir=str(out))
    for run in cfg.runs():
        directory = run_dir(cfg, run)
        directory.mkdir(parents=True)
        (directory / "config.yaml").write_text(yaml.safe_dump(fit_config(run, directory), sort_keys=False))
        (directory / RESULT_FILE).write_text(json.dumps({"arm": run.arm}))


@pytest.fixture
def finished(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(EXPERIMENT))
    finish_all(tmp_path, tmp_path / "out")
    return tmp_path


def test_unchanged_experiment_resumes_even_from_a_moved_directory(finished):
    check_finished_runs(load_experiment(finished / "exp.yaml", out_dir=str(finished / "out")))
    # the logger's save_dir names the old place; it is not part of what was trained
    (finished / "out").rename(finished / "moved")
    check_finished_runs(load_experiment(finished / "exp.yaml", out_dir=str(finished / "moved")))


def test_a_changed_base_refuses_to_mix_old_and_new_runs(finished):
    changed = json.loads(json.dumps(BASE))
    changed["trainer"]["callbacks"][0]["init_args"]["finetune_lr"] = 0.01
    (finished / "base.yaml").write_text(yaml.safe_dump(changed))
    with pytest.raises(StaleRunError) as err:
        check_finished_runs(load_experiment(finished / "exp.yaml", out_dir=str(finished / "out")))
    message = str(err.value)
    assert "2 finished run(s)" in message
    assert "trainer.callbacks.0.init_args.finetune_lr: 0.1 -> 0.01" in message
    assert "--out" in message
    # the Python entry point checks too, before it trains anything (the unfinished run would fail: class "M")
    (finished / "out" / "runs" / "nexus" / "seed0" / RESULT_FILE).unlink()
    with pytest.raises(StaleRunError, match="1 finished run"):
        run_experiment(load_experiment(finished / "exp.yaml", out_dir=str(finished / "out")))


@pytest.mark.parametrize("report_only", [False, True])
def test_cli_refuses_a_changed_arm_before_training_and_deletes_nothing(finished, report_only):
    exp = json.loads(json.dumps(EXPERIMENT))
    exp["arms"][1]["callbacks"] = [{"class_path": "N", "init_args": {"inner_lr": 0.1}}]
    (finished / "exp.yaml").write_text(yaml.safe_dump(exp))
    before = sorted(p.relative_to(finished) for p in (finished / "out").rglob("*"))
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(finished / "exp.yaml"), "--out", str(finished / "out")] + ["--report-only"] * report_only)
    assert "nexus/seed0" in str(exit_.value) and "init_args" in str(exit_.value)
    assert "adamw/seed0" not in str(exit_.value)  # only the arm that changed is named
    assert sorted(p.relative_to(finished) for p in (finished / "out").rglob("*")) == before


# ---------------------------------------------------------------------- nothing outlives the runner
ROOT = Path(__file__).resolve().parents[2]
_FAMILY = """
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {grandchild.pid}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(300)
"""
_RUNNER = """
import sys
from lightning_nexus.tools.experiment.runner import forward_stop_signals, run_supervised
with forward_stop_signals():
    run_supervised([sys.executable, "-c", sys.argv[1], sys.argv[2]])
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _start_runner(tmp_path):
    pids = tmp_path / "pids"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runner = subprocess.Popen([sys.executable, "-c", _RUNNER, _FAMILY, str(pids)], env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while not pids.exists():
        assert runner.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    child, grandchild = map(int, pids.read_text().split())
    assert _alive(child) and _alive(grandchild)
    return runner, child, grandchild


def _gone(pids, timeout=15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killing_the_runner_leaves_no_orphan(tmp_path, sig):
    """The runner is a real process killed with SIGKILL (parent-death signal) or SIGTERM (forwarded): its fit
    child and the child's own child (as DDP ranks or loader workers would be) are gone within seconds."""
    runner, child, grandchild = _start_runner(tmp_path)
    supervisor_pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent_of(int(p)) == runner.pid]
    os.kill(runner.pid, getattr(signal, sig))
    code = runner.wait(timeout=30)
    assert code == (-signal.SIGKILL if sig == "SIGKILL" else 128 + signal.SIGTERM)
    assert _gone([child, grandchild, *supervisor_pids]) == []


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def test_a_second_runner_on_the_same_directory_is_refused(finished):
    out = finished / "out"
    (out / "runs" / "nexus" / "seed0" / RESULT_FILE).unlink()  # one run left to train
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from lightning_nexus.tools.experiment.runner import "
            "runner_lock\nwith runner_lock(Path(sys.argv[1])):\n    Path(sys.argv[1], 'held').touch(); time.sleep(60)",
            str(out),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        while not (out / "held").exists():
            assert holder.poll() is None
            time.sleep(0.05)
        with pytest.raises(SystemExit) as exit_:
            main(["--config", str(finished / "exp.yaml"), "--out", str(out)])
        assert f"another experiment runner (pid {holder.pid}" in str(exit_.value)
        assert "--out" in str(exit_.value)
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the lock with the holder: the next runner gets it
    with runner_lock(out):
        pass
