"""Find the packaged recipe YAMLs: ``--config quickstart`` works from any directory with an installed wheel.

The recipes live in the repository's ``recipes/`` folder and install as the package
``lightning_nexus_recipes``. Its location is looked up without importing it (which would load the models
and Lightning just to read a YAML).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

RECIPES_PACKAGE = "lightning_nexus_recipes"


class RecipeNotFound(FileNotFoundError):
    """Neither a file nor a packaged recipe of that name exists."""


def recipe_dir() -> Path:
    """The folder holding the packaged recipe YAMLs."""
    spec = importlib.util.find_spec(RECIPES_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RecipeNotFound(f"the package {RECIPES_PACKAGE} is not installed; reinstall lightning-nexus")
    return Path(next(iter(spec.submodule_search_locations)))


def available() -> dict[str, Path]:
    """Recipe name (file stem) -> YAML path, sorted by name."""
    return {p.stem: p for p in sorted(recipe_dir().glob("*.yaml"))}


def resolve_config(value: str) -> str:
    """``value`` if it is an existing file, else the packaged recipe it names.

    ``quickstart``, ``quickstart.yaml`` and ``recipes/quickstart.yaml`` (the clone's path, used from
    elsewhere) all name the packaged ``quickstart.yaml``. Anything else is returned unchanged, so
    LightningCLI reports a missing file as usual.
    """
    if Path(value).exists():
        return value
    path = Path(value)
    if len(path.parts) == 1 or (len(path.parts) == 2 and path.parts[0] == "recipes"):
        name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
        recipes = available()
        if name in recipes:
            return str(recipes[name])
    return value


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config``/``-c`` value passed through :func:`resolve_config`."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg[len("--config=") :])
    return out


def describe(path: Path) -> tuple[str, str]:
    """(first header line, 'Target hardware' line) of a recipe YAML, without the comment marks."""
    summary, hardware = "", ""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("# ").strip()
        if not summary:
            summary = text
        if text.startswith("Target hardware:"):
            hardware = text[len("Target hardware:") :].split(". ")[0].strip().rstrip(".")
    return summary, hardware


def command_for(path: Path) -> str:
    """``experiment`` for an experiment file (it has ``arms`` or ``extends``), else ``fit``."""
    keys = yaml.safe_load(path.read_text()) or {}
    return "experiment" if "arms" in keys or "extends" in keys else "fit"


def main(argv: list[str] | None = None) -> None:
    """``lightning-nexus recipes``: every packaged recipe, the command that runs it, its target hardware."""
    if argv:
        raise SystemExit(f"error: `lightning-nexus recipes` takes no arguments, got {' '.join(argv)}")
    recipes = available()
    width = max(len(n) for n in recipes)
    print(f"{'recipe':<{width}}  {'command':<10}  target hardware")
    for name, path in recipes.items():
        _, hardware = describe(path)
        print(f"{name:<{width}}  {command_for(path):<10}  {hardware or '-'}")
    print(
        f"\nRun one with `lightning-nexus fit --config NAME` (or `experiment --config NAME`); files in {recipe_dir()}"
    )
