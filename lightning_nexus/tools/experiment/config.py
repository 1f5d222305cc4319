"""The experiment file: a base ``lightning-nexus fit`` config, arms that change it, seeds and budgets.

An arm is the base config plus dotted-key overrides (``set``) and extra callbacks (``callbacks``). Its
``budgets`` are step multipliers: each budget is a separate run that completes its *own* LR schedule
(``trainer.max_steps`` scaled), which is how loss-matched comparisons avoid the schedule confound
(a faster arm reaches a loss level earlier in its decay, so points along one schedule are
not comparable). Every run of seed ``s`` sets ``seed_everything: s`` and ``data.init_args.seed: s``, so
all arms of a seed start from the same weights and see the same data order.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ExperimentConfigError(ValueError):
    """A problem in the experiment file; the message names the key and the fix."""


@dataclass
class Arm:
    name: str
    set: dict[str, Any] = field(default_factory=dict)
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    budgets: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class RunSpec:
    """One training run: an arm at one budget and seed."""

    arm: str
    budget: float
    seed: int
    config: dict[str, Any]

    @property
    def label(self) -> str:
        return self.arm if self.budget == 1.0 else f"{self.arm}@{self.budget:g}x"

    @property
    def key(self) -> str:
        return f"{self.label}/seed{self.seed}"


@dataclass
class ExperimentConfig:
    base: dict[str, Any]
    arms: list[Arm]
    seeds: list[int]
    reference: str
    out_dir: Path
    workers: int = 1
    loss_match_tolerance: float = 0.005
    evaluations: int = 5
    source: Path | None = None

    def runs(self) -> list[RunSpec]:
        """Every run, seed-major, so an interrupted experiment has complete seeds rather than complete arms."""
        return [
            RunSpec(arm.name, budget, seed, build_run_config(self.base, arm, budget, seed, self.evaluations))
            for seed in self.seeds
            for arm in self.arms
            for budget in arm.budgets
        ]


_TOP_KEYS = {
    "extends",
    "base",
    "set",
    "arms",
    "seeds",
    "reference",
    "out_dir",
    "workers",
    "loss_match_tolerance",
    "evaluations",
}
_ARM_KEYS = {"name", "set", "callbacks", "budgets"}


def load_experiment(
    path: str | Path,
    out_dir: str | Path | None = None,
    seeds: list[int] | None = None,
    workers: int | None = None,
    only_arms: list[str] | None = None,
) -> ExperimentConfig:
    """Read and check an experiment file; command-line values override the file's. ``only_arms`` keeps
    just those arms (a follow-up on a few arms with fresh seeds); it must include the reference."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentConfigError(f"{path}: no such experiment file (try recipes/evidence.yaml)")
    raw = _read_with_extends(path, seen=())
    for key in ("base", "arms", "seeds", "reference"):
        if key not in raw:
            raise ExperimentConfigError(f"{path}: missing required key {key!r}")

    base = raw["base"]
    if isinstance(base, str):  # a fit config file, relative to the experiment file (resolved while reading)
        base_path = Path(base)
        if not base_path.is_file():
            raise ExperimentConfigError(f"{path}: base={base!r} does not exist (looked at {base_path})")
        base = yaml.safe_load(base_path.read_text())
    if not isinstance(base, dict) or "trainer" not in base or "model" not in base:
        raise ExperimentConfigError(
            f"{path}: base must be a `lightning-nexus fit` config with trainer and model sections"
        )
    for dotted, value in (raw.get("set") or {}).items():  # shared overrides, e.g. a smaller smoke-test size
        _set_dotted(base, dotted, value, "<all arms>")
    if not isinstance(base["trainer"].get("max_steps"), int) or base["trainer"]["max_steps"] <= 0:
        raise ExperimentConfigError(f"{path}: base trainer.max_steps must be a positive integer (budgets scale it)")

    arms = [_parse_arm(path, i, a) for i, a in enumerate(raw["arms"] or [])]
    if not arms:
        raise ExperimentConfigError(f"{path}: arms is empty")
    names = [a.name for a in arms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ExperimentConfigError(f"{path}: arm names must be unique, repeated: {dupes}")
    reference = raw["reference"]
    if reference not in names:
        raise ExperimentConfigError(f"{path}: reference={reference!r} is not an arm; arms: {names}")
    if only_arms is not None:
        unknown = [n for n in only_arms if n not in names]
        if unknown:
            raise ExperimentConfigError(f"{path}: no arm(s) named {unknown}; arms: {names}")
        if reference not in only_arms:
            raise ExperimentConfigError(
                f"{path}: the selected arms must include the reference {reference!r}: every arm is compared with it"
            )
        arms = [a for a in arms if a.name in only_arms]

    seeds = list(seeds if seeds is not None else raw["seeds"])
    if not seeds or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise ExperimentConfigError(f"{path}: seeds must be a non-empty list of distinct integers, got {seeds!r}")
    workers = int(workers if workers is not None else raw.get("workers", 1))
    if workers < 1:
        raise ExperimentConfigError(f"{path}: workers must be >= 1, got {workers}")
    tol = float(raw.get("loss_match_tolerance", 0.005))
    if tol <= 0:
        raise ExperimentConfigError(f"{path}: loss_match_tolerance must be > 0, got {tol}")
    evaluations = raw.get("evaluations", 5)
    if not isinstance(evaluations, int) or evaluations < 2:
        raise ExperimentConfigError(
            f"{path}: evaluations must be an integer >= 2 (points per run), got {evaluations!r}"
        )
    accumulate = base["trainer"].get("accumulate_grad_batches", 1)
    if not isinstance(accumulate, int) or accumulate < 1:
        raise ExperimentConfigError(
            f"{path}: base trainer.accumulate_grad_batches must be a positive integer, got {accumulate!r}"
        )
    out = Path(out_dir if out_dir is not None else raw.get("out_dir", f"runs/{path.stem}"))
    cfg = ExperimentConfig(base, arms, seeds, reference, out, workers, tol, evaluations, source=path)
    cfg.runs()  # builds every run's config: a bad dotted key fails now, not after an hour of training
    return cfg


def _read_with_extends(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """The file's keys over those of the file it ``extends`` (relative paths resolved from each file)."""
    if path.resolve() in seen:
        raise ExperimentConfigError(f"{path}: 'extends' forms a cycle through {[str(p) for p in seen]}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ExperimentConfigError(f"{path}: expected a mapping with keys {sorted(_TOP_KEYS)}")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ExperimentConfigError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    if isinstance(raw.get("base"), str) and not Path(raw["base"]).is_absolute():
        raw["base"] = str(path.parent / raw["base"])
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    parent_path = path.parent / parent
    if not parent_path.is_file():
        raise ExperimentConfigError(f"{path}: extends={parent!r} does not exist (looked at {parent_path})")
    merged = _read_with_extends(parent_path, seen + (path.resolve(),))
    # `set` accumulates (the child refines the parent's overrides); every other key is replaced
    merged_set = {**(merged.get("set") or {}), **(raw.pop("set", None) or {})}
    merged.update(raw)
    if merged_set:
        merged["set"] = merged_set
    return merged


def _parse_arm(path: Path, index: int, raw: Any) -> Arm:
    where = f"{path}: arms[{index}]"
    if not isinstance(raw, dict) or "name" not in raw:
        raise ExperimentConfigError(
            f"{where}: each arm is a mapping with a 'name' (and optional set/callbacks/budgets)"
        )
    unknown = set(raw) - _ARM_KEYS
    if unknown:
        raise ExperimentConfigError(
            f"{where} ({raw['name']}): unknown key(s) {sorted(unknown)}; allowed: {sorted(_ARM_KEYS)}"
        )
    name = str(raw["name"])
    if not name or any(c in name for c in "/\\@ ") or name.startswith("."):
        raise ExperimentConfigError(f"{where}: arm name {name!r} must be a plain word (no '/', '@', spaces)")
    budgets = [float(b) for b in raw.get("budgets", [1.0])]
    if not budgets or any(b <= 0 for b in budgets) or len(set(budgets)) != len(budgets):
        raise ExperimentConfigError(
            f"{where} ({name}): budgets must be distinct positive step multipliers, got {budgets}"
        )
    if 1.0 not in budgets:
        raise ExperimentConfigError(f"{where} ({name}): budgets must include 1.0 (the equal-steps run)")
    callbacks = raw.get("callbacks") or []
    if not isinstance(callbacks, list) or not all(isinstance(c, dict) and "class_path" in c for c in callbacks):
        raise ExperimentConfigError(f"{where} ({name}): callbacks must be a list of {{class_path, init_args}} mappings")
    overrides = raw.get("set") or {}
    if not isinstance(overrides, dict):
        raise ExperimentConfigError(
            f"{where} ({name}): set must map dotted keys to values, e.g. model.init_args.lr: 0.02"
        )
    return Arm(name, dict(overrides), list(callbacks), sorted(budgets))


def build_run_config(base: dict[str, Any], arm: Arm, budget: float, seed: int, evaluations: int = 5) -> dict[str, Any]:
    """The complete fit config of one run (the runner adds the logger).

    ``max_steps`` is rounded to a multiple of ``evaluations`` and validation is placed every
    ``max_steps / evaluations`` optimizer steps, so every run, whatever its budget, is evaluated at its
    last step: the end of its own schedule is what loss-matched comparisons use.
    """
    cfg = copy.deepcopy(base)
    for dotted, value in arm.set.items():
        _set_dotted(cfg, dotted, copy.deepcopy(value), arm.name)
    trainer = cfg["trainer"]
    every = max(1, round(trainer["max_steps"] * budget / evaluations))
    trainer["max_steps"] = every * evaluations
    trainer["val_check_interval"] = every * int(trainer.get("accumulate_grad_batches", 1))  # in micro-batches
    trainer["check_val_every_n_epoch"] = None
    trainer["callbacks"] = list(trainer.get("callbacks") or []) + copy.deepcopy(arm.callbacks)
    cfg["seed_everything"] = seed
    data = cfg.get("data")
    if isinstance(data, dict):
        data.setdefault("init_args", {})["seed"] = seed
    return cfg


def _set_dotted(cfg: dict[str, Any], dotted: str, value: Any, arm: str) -> None:
    """``a.b.2.c`` sets ``cfg["a"]["b"][2]["c"]``; intermediate sections must exist, the last key may be new."""
    keys = dotted.split(".")
    node: Any = cfg
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
            continue
        if isinstance(node, dict) and (last or isinstance(node.get(key), (dict, list))):
            if last:
                node[key] = value
            else:
                node = node[key]
            continue
        have = (
            sorted(node)
            if isinstance(node, dict)
            else f"a list of {len(node)}"
            if isinstance(node, list)
            else repr(node)
        )
        raise ExperimentConfigError(
            f"arm {arm!r}: set key {dotted!r}: {'.'.join(keys[: i + 1])!r} is not a section of the base config "
            f"(available at {'.'.join(keys[:i]) or 'the top'}: {have})"
        )
