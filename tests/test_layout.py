"""The dependency rules of docs/design.md: the plugin never imports the tools or the recipes, the tools
never import the recipes, and the core loads no Lightning."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# __main__.py is `python -m lightning_nexus`, the command line itself: an entry point, not plugin code
PLUGIN = [
    p
    for p in (ROOT / "lightning_nexus").rglob("*.py")
    if "tools" not in p.relative_to(ROOT).parts and p.name != "__main__.py"
]
TOOLS = list((ROOT / "lightning_nexus" / "tools").rglob("*.py"))


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", PLUGIN, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugin_imports_neither_tools_nor_recipes(path):
    bad = {n for n in imported(path) if n.startswith(("lightning_nexus.tools", "lightning_nexus_recipes", "recipes"))}
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_tools_do_not_import_recipes(path):
    bad = {n for n in imported(path) if n.startswith(("lightning_nexus_recipes", "recipes"))}
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; name recipe classes by class_path instead"


def test_core_loads_no_lightning():
    code = "import sys, lightning_nexus.core; print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_package_names_load_lazily():
    import lightning_nexus

    for name in lightning_nexus.__all__:
        assert getattr(lightning_nexus, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        lightning_nexus.Nope  # noqa: B018


def test_nothing_in_the_repository_refers_to_files_outside_it():
    skip = {".git", ".venv", "build", "runs", "lightning_logs", ".pytest_cache", "__pycache__"}
    offenders = []
    for path in ROOT.rglob("*"):
        if (
            skip & set(path.relative_to(ROOT).parts)
            or not path.is_file()
            or path.suffix not in {".py", ".md", ".yaml", ".toml", ".sh"}
        ):
            continue
        if path == Path(__file__) or path.name == "test_docs.py":
            continue
        text = path.read_text(errors="replace")
        if "DESIGN.md" in text or "../shared" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"these refer to a design note outside the repository (use docs/design.md): {offenders}"
