"""The experiment file: arms, budgets, seeds, shared overrides and their errors."""

from pathlib import Path

import pytest
import yaml

from lightning_nexus.tools.experiment.config import ExperimentConfigError, load_experiment

BASE = {
    "seed_everything": 0,
    "trainer": {
        "max_steps": 100,
        "accumulate_grad_batches": 4,
        "callbacks": [{"class_path": "A", "init_args": {"x": 1}}],
    },
    "model": {"class_path": "M", "init_args": {"lr": 0.001}},
    "data": {"class_path": "D", "init_args": {"batch_size": 8}},
}


def write(tmp_path: Path, name: str, content: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(content))
    return path


def experiment(**over) -> dict:
    exp = {
        "base": "base.yaml",
        "seeds": [0, 1],
        "reference": "adamw",
        "arms": [
            {"name": "adamw", "budgets": [0.8, 1.0, 1.2]},
            {"name": "nexus", "callbacks": [{"class_path": "N", "init_args": {"inner_lr": 0.05}}]},
            {"name": "muon", "set": {"model.init_args.optimizer": "muon", "model.init_args.lr": 0.02}},
        ],
    }
    exp.update(over)
    return exp


def test_runs_expand_arms_budgets_and_seeds(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    cfg = load_experiment(write(tmp_path, "exp.yaml", experiment(evaluations=5)))
    runs = cfg.runs()
    assert [r.key for r in runs[:5]] == [
        "adamw@0.8x/seed0",
        "adamw/seed0",
        "adamw@1.2x/seed0",
        "nexus/seed0",
        "muon/seed0",
    ]
    assert len(runs) == 10
    by_key = {r.key: r.config for r in runs}
    # budgets scale the schedule length; validation lands every max_steps/evaluations outer steps (x K micro-batches)
    assert by_key["adamw@0.8x/seed1"]["trainer"]["max_steps"] == 80
    assert by_key["adamw@1.2x/seed0"]["trainer"]["val_check_interval"] == 24 * 4
    assert by_key["adamw/seed0"]["trainer"]["check_val_every_n_epoch"] is None
    # the seed drives both model init and data order; the arm's callbacks are appended to the base's
    assert by_key["nexus/seed1"]["seed_everything"] == 1 and by_key["nexus/seed1"]["data"]["init_args"]["seed"] == 1
    assert [c["class_path"] for c in by_key["nexus/seed0"]["trainer"]["callbacks"]] == ["A", "N"]
    assert by_key["muon/seed0"]["model"]["init_args"] == {"lr": 0.02, "optimizer": "muon"}
    assert BASE["model"]["init_args"] == {"lr": 0.001}  # the base is never mutated


def test_max_steps_is_rounded_to_a_multiple_of_the_evaluations(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    cfg = load_experiment(write(tmp_path, "exp.yaml", experiment(evaluations=3)))
    for run in cfg.runs():
        trainer = run.config["trainer"]
        assert trainer["max_steps"] % 3 == 0
        assert trainer["val_check_interval"] * 3 == trainer["max_steps"] * 4


def test_extends_replaces_keys_and_accumulates_set(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    write(tmp_path, "parent.yaml", experiment(set={"model.init_args.lr": 0.5}))
    child = write(
        tmp_path,
        "child.yaml",
        {
            "extends": "parent.yaml",
            "seeds": [7],
            "set": {"trainer.max_steps": 10, "trainer.callbacks.0.init_args.x": 2},
        },
    )
    cfg = load_experiment(child)
    assert cfg.seeds == [7]
    run = cfg.runs()[1]
    assert run.config["model"]["init_args"]["lr"] == 0.5
    assert run.config["trainer"]["max_steps"] == 10
    assert run.config["trainer"]["callbacks"][0]["init_args"] == {"x": 2}


@pytest.mark.parametrize(
    "over, message",
    [
        ({"reference": "sgd"}, "reference='sgd' is not an arm"),
        ({"seeds": []}, "seeds must be a non-empty list"),
        ({"arms": [{"name": "adamw"}, {"name": "adamw"}]}, "arm names must be unique"),
        ({"arms": [{"name": "adamw", "budgets": [0.5]}]}, "budgets must include 1.0"),
        ({"arms": [{"name": "adamw", "set": {"modle.init_args.lr": 1}}]}, "'modle' is not a section"),
        ({"arms": [{"name": "a/b"}], "reference": "a/b"}, "must be a plain word"),
        ({"arms": [{"name": "adamw", "lr": 1}]}, "unknown key(s) ['lr']"),
        ({"workers": 0}, "workers must be >= 1"),
        ({"evaluations": 1}, "evaluations must be an integer >= 2"),
        ({"bogus": 1}, "unknown key(s) ['bogus']"),
        ({"base": "missing.yaml"}, "does not exist"),
    ],
)
def test_bad_experiment_files_name_the_problem(tmp_path, over, message):
    write(tmp_path, "base.yaml", BASE)
    with pytest.raises(ExperimentConfigError, match=None) as err:
        load_experiment(write(tmp_path, "exp.yaml", experiment(**over)))
    assert message in str(err.value)


def test_only_arms_keeps_the_selection_in_file_order(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    path = write(tmp_path, "exp.yaml", experiment())
    cfg = load_experiment(path, only_arms=["muon", "adamw"], seeds=[5])
    assert [r.key for r in cfg.runs()] == ["adamw@0.8x/seed5", "adamw/seed5", "adamw@1.2x/seed5", "muon/seed5"]
    with pytest.raises(ExperimentConfigError, match="must include the reference 'adamw'"):
        load_experiment(path, only_arms=["muon"])
    with pytest.raises(ExperimentConfigError, match=r"no arm\(s\) named \['muon2'\]"):
        load_experiment(path, only_arms=["adamw", "muon2"])


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path, "a.yaml", {"extends": "b.yaml"})
    write(tmp_path, "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ExperimentConfigError, match="cycle"):
        load_experiment(tmp_path / "a.yaml")


def test_shipped_presets_load():
    root = Path(__file__).resolve().parents[2] / "recipes"
    real = load_experiment(root / "evidence.yaml")
    tiny = load_experiment(root / "evidence_tiny.yaml")
    assert len(real.seeds) >= 5 and [a.name for a in real.arms] == [a.name for a in tiny.arms]
    names = {a.name for a in real.arms}
    assert {"adamw", "nexus_g0", "nexus_raw", "nexus_sample", "muon", "muon_nexus"} <= names
    assert sum(n.startswith("nexus_g0.") for n in names) >= 2  # a gamma grid
    assert len(next(a for a in real.arms if a.name == real.reference).budgets) >= 3
