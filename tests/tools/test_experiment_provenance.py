"""The code fingerprint of experiment runs: it changes with any source edit, and the report warns when the runs
it compares were trained on more than one version."""

import importlib

from lightning_nexus.tools.experiment.provenance import provenance, source_fingerprint, versions_in
from lightning_nexus.tools.experiment.report import code_lines


def make_package(root, files):
    for name, text in files.items():
        path = root / "prov_pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    importlib.invalidate_caches()


def test_fingerprint_follows_every_source_edit(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    make_package(tmp_path, {"__init__.py": "", "core.py": "x = 1\n", "sub/mod.py": "y = 2\n"})
    first = source_fingerprint(("prov_pkg",))
    assert len(first) == 12 and first == source_fingerprint(("prov_pkg",))
    (tmp_path / "prov_pkg" / "notes.txt").write_text("not code")
    assert source_fingerprint(("prov_pkg",)) == first  # only sources count
    make_package(tmp_path, {"sub/mod.py": "y = 3\n"})  # a nested module's edit
    edited = source_fingerprint(("prov_pkg",))
    assert edited != first
    make_package(tmp_path, {"sub/other.py": ""})  # a new, empty module
    assert source_fingerprint(("prov_pkg",)) not in (first, edited)


def test_a_missing_package_has_a_fingerprint_of_its_own():
    assert source_fingerprint(("no_such_package_here",)) != source_fingerprint(("lightning_nexus",))


def test_provenance_names_code_and_libraries():
    found = provenance()
    assert found["code"] == source_fingerprint()
    assert found["torch"].split("+")[0].count(".") >= 1 and "lightning" in found and "litdata" in found


def result(label, seed, code):
    prov = {"code": code, "torch": "2.14.1", "lightning": "2.6.6", "litdata": "0.2"} if code else None
    return {"label": label, "seed": seed, **({"provenance": prov} if prov else {})}


def test_report_states_one_version_and_warns_for_several():
    one = code_lines([result("adamw", 0, "aaaaaaaaaaaa"), result("nexus", 0, "aaaaaaaaaaaa")])
    assert one == ["- trained on: code aaaaaaaaaaaa, torch 2.14.1, lightning 2.6.6, litdata 0.2 (every run)"]

    mixed = [result("adamw", 0, "aaaaaaaaaaaa"), result("nexus", 0, "bbbbbbbbbbbb"), result("nexus", 1, None)]
    lines = code_lines(mixed)
    assert "warning" in lines[0] and "3 different versions" in lines[0]
    assert any("bbbbbbbbbbbb" in line and "nexus/seed0" in line for line in lines[1:])
    assert any("code not recorded" in line and "nexus/seed1" in line for line in lines[1:])
    assert list(versions_in(mixed).values()) == [["adamw/seed0"], ["nexus/seed0"], ["nexus/seed1"]]
