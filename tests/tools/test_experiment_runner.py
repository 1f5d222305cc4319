"""The runner's resume rule: finished runs are kept only while the experiment file still gives their config."""

import json
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
