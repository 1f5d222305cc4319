"""An installed wheel works without the clone: its own top-level names, packaged recipes found by name."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _packages_in_tree() -> set[str]:
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lightning_nexus").rglob("__init__.py")}
    found |= {
        ".".join(("lightning_nexus_recipes", *p.parent.relative_to(ROOT / "recipes").parts))
        for p in (ROOT / "recipes").rglob("__init__.py")
    }
    return found


@pytest.mark.slow
def test_wheel_installs_and_runs_the_quickstart_by_name(tmp_path):
    # built from a copy: setuptools' build/ would otherwise keep modules the tree no longer has
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info", "benchmarks", "__pycache__"),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(src)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("lightning_nexus-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {
        "lightning_nexus",
        "lightning_nexus_recipes",
        wheel.name.split("-py3")[0] + ".dist-info",
    }
    packaged = {".".join(n.split("/")[:-1]) for n in names if n.endswith("/__init__.py")}
    assert packaged == _packages_in_tree(), "pyproject's package list is out of date"
    assert "lightning_nexus_recipes/quickstart.yaml" in names

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    work = tmp_path / "elsewhere"
    work.mkdir()
    # PYTHONPATH puts the wheel's copy ahead of the clone's editable install; -P keeps the cwd off sys.path
    env = {**os.environ, "PYTHONPATH": str(site), "HOME": str(tmp_path)}
    where = subprocess.run(
        [sys.executable, "-P", "-c", "import lightning_nexus, lightning_nexus_recipes as r; print(lightning_nexus.__file__, r.__file__)"],
        cwd=work, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert all(p.startswith(str(site)) for p in where.stdout.split()), where.stdout
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "lightning_nexus", "fit", "--config", "quickstart", "--trainer.max_steps", "3",
         "--trainer.logger.init_args.save_dir", "runs", "--data.init_args.cache_dir", str(tmp_path / "cache"),
         "--data.init_args.corpus_bytes_per_source", "100000", "--data.init_args.val_batches_per_source", "1"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "val loss after step 3" in proc.stdout
    assert list((work / "runs" / "quickstart").glob("version_0/events.out.tfevents.*"))
