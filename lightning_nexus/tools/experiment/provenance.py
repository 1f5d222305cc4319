"""Which code trained a run, so that a report never silently compares runs trained on different code.

Every run is a fresh ``lightning-nexus fit`` process that imports the installed sources when it starts. With
an editable install, an edit made while a long experiment is running therefore reaches every run started
after it, and nothing in the configs would show it. The fingerprint is a hash of the sources of both
packages; the runner records it (with the versions of the libraries that decide the numerics) in each
``result.json``, warns when resuming next to runs trained on other code, and the report names every
version it found.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

PACKAGES = ("lightning_nexus", "lightning_nexus_recipes")
DISTRIBUTIONS = ("torch", "lightning", "litdata")
NOT_RECORDED = "not recorded"


def source_fingerprint(packages: tuple[str, ...] = PACKAGES) -> str:
    """12 hex digits of a SHA-256 over the path and bytes of every ``.py`` file of ``packages``."""
    digest = hashlib.sha256()
    for name in packages:
        spec = importlib.util.find_spec(name)
        roots = list(spec.submodule_search_locations or []) if spec is not None else []
        if not roots:
            digest.update(f"{name}: not installed\0".encode())
        for root in map(Path, sorted(roots)):
            for path in sorted(root.rglob("*.py")):
                digest.update(f"{name}/{path.relative_to(root).as_posix()}\0".encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def provenance() -> dict[str, str]:
    """The fingerprint of the sources and the versions of the libraries a run's numbers depend on."""
    found = {"code": source_fingerprint()}
    for dist in DISTRIBUTIONS:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


def describe(result: dict[str, Any]) -> str:
    """One line naming the code and library versions a finished run was trained on."""
    found = result.get("provenance")
    if not found:
        return f"code {NOT_RECORDED}"
    return f"code {found.get('code', NOT_RECORDED)}, " + ", ".join(f"{d} {found.get(d, '?')}" for d in DISTRIBUTIONS)


def versions_in(results: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The runs (``label/seedK``) trained on each version, in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for result in results:
        groups.setdefault(describe(result), []).append(f"{result['label']}/seed{result['seed']}")
    return groups
