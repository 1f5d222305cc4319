"""No silent garbage: binary, non-UTF-8 and malformed JSONL data, zero weights and unstated tokenizers
are refused before training, naming the file (and line) and the fix."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lightning_nexus.data import MixedSourceDataModule, SourceError, SourceSpec
from lightning_nexus.data.validate import PREFIX_BYTES

ROOT = Path(__file__).resolve().parents[2]


def _dm(tmp_path, *specs, **kw) -> MixedSourceDataModule:
    kw = {"block_size": 8, "batch_size": 2, "val_batches_per_source": 0, **kw}
    return MixedSourceDataModule(sources=list(specs), cache_dir=str(tmp_path / "cache"), **kw)


def _refused(tmp_path, spec: SourceSpec, match: str) -> None:
    with pytest.raises(SourceError, match=match):
        _dm(tmp_path, spec).prepare_data()
    assert not (tmp_path / "cache" / "sources").exists()  # refused before anything was tokenized


def _npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.arange(100))
    return buf.getvalue()


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.txt", "hello " * 100)
    return buf.getvalue()


def _parquet(path: Path) -> bytes:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["hello"] * 50}), path)
    return path.read_bytes()


@pytest.mark.parametrize(
    "kind, what, fix",
    [
        ("random", "binary data \\(it contains NUL bytes\\)", "use format: tokens with dtype"),
        ("elf", "an ELF executable", "remove it from paths"),
        ("gzip", "a gzip file", "gunzip"),
        ("zip", "a zip archive", "unpack it"),
        ("npy", "a NumPy .npy array", "format: tokens"),
        ("parquet", "a Parquet file", "use format: parquet"),
        ("tokens", "binary data", "format: tokens with dtype: uint16 or uint32"),
    ],
)
def test_binary_files_given_as_text_are_refused(tmp_path, kind, what, fix):
    p = tmp_path / f"data.{kind}"
    rng = np.random.default_rng(0)
    data = {
        "random": lambda: rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes(),
        "elf": lambda: Path(sys.executable).resolve().read_bytes()[:50_000],
        "gzip": lambda: gzip.compress(b"hello world " * 1000),
        "zip": _zip,
        "npy": _npy,
        "parquet": lambda: _parquet(tmp_path / "t.parquet"),
        "tokens": lambda: (np.arange(20_000) % 300).astype(np.uint16).tobytes(),  # nanoGPT-style train.bin
    }[kind]()
    p.write_bytes(data)
    for fmt in ("text", "jsonl"):
        _refused(tmp_path, SourceSpec("web", [str(p)], format=fmt), rf"source 'web': {p} is {what}.*{fix}")


def test_datasets_save_to_disk_dir_given_as_text_is_refused(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["hello world"] * 200}).save_to_disk(str(tmp_path / "hf"))
    _refused(
        tmp_path, SourceSpec("hf", [str(tmp_path / "hf")]), r"source 'hf': .*\.arrow is an Arrow stream.*format: arrow"
    )


def test_latin1_text_is_refused_naming_the_byte_offset(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes("Ein schöner Tag für Bäume. ".encode("latin-1") * 200)
    _refused(tmp_path, SourceSpec("de", [str(p)]), rf"source 'de': {p} is not valid UTF-8 \(byte offset 7: .*iconv")


def test_invalid_utf8_past_the_checked_prefix_is_refused_while_tokenizing(tmp_path):
    p = tmp_path / "late.txt"
    p.write_bytes(b"a" * (PREFIX_BYTES + 100) + "é".encode("latin-1") + b"b" * 100)
    with pytest.raises(SourceError, match=rf"{p} is not valid UTF-8 \(byte offset {PREFIX_BYTES + 100}:"):
        _dm(tmp_path, SourceSpec("late", [str(p)])).prepare_data()


def test_utf8_character_cut_by_the_prefix_end_is_accepted(tmp_path):
    p = tmp_path / "ok.txt"
    p.write_bytes(b"a" * (PREFIX_BYTES - 1) + "é".encode() * 10)  # é straddles the prefix boundary
    dm = _dm(tmp_path, SourceSpec("ok", [str(p)]))
    dm.prepare_data()
    assert dm.source_names == ["ok"]


@pytest.mark.parametrize(
    "record, match",
    [
        ({"text": None}, r"x.jsonl:3 has 'text': null; drop the record"),
        ({"text": 5}, r"x.jsonl:3 has 'text' of type int, not a string"),
        ({"text": ["a", "b"]}, r"x.jsonl:3 has 'text' of type list, not a string"),
        ({"body": "x"}, r"x.jsonl:3 has no field 'text'; set field"),
    ],
)
def test_jsonl_records_without_a_string_field_are_refused_with_file_and_line(tmp_path, record, match):
    p = tmp_path / "x.jsonl"
    lines = [json.dumps({"text": "fine " * 20}), "", json.dumps(record), json.dumps({"text": "more " * 20})]
    p.write_text("\n".join(lines) + "\n")
    _refused(tmp_path, SourceSpec("j", [str(p)], format="jsonl"), rf"source 'j': .*{match}")


def test_bad_jsonl_record_past_the_checked_prefix_is_refused_while_tokenizing(tmp_path):
    p = tmp_path / "x.jsonl"
    good = [json.dumps({"text": f"record {i}"}) for i in range(1500)]
    p.write_text("\n".join(good + [json.dumps({"text": None})]) + "\n")
    with pytest.raises(SourceError, match=r"x.jsonl:1501 has 'text': null"):
        _dm(tmp_path, SourceSpec("j", [str(p)], format="jsonl")).prepare_data()


def test_zero_weight_train_source_is_refused(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("hello " * 100)
    with pytest.raises(SourceError, match=r"source 'a': a train source needs weight > 0, got 0; .*role: ood"):
        _dm(tmp_path, SourceSpec("a", [str(p)], weight=0))
    with pytest.raises(SourceError, match=r"source 'b': a train source needs weight > 0, got 0.0"):
        _dm(tmp_path, SourceSpec("a", [str(p)]), SourceSpec("b", [str(p)], weight=0.0))
    _dm(tmp_path, SourceSpec("a", [str(p)]), SourceSpec("held", [str(p)], weight=0, role="ood"))  # fine for ood


def test_pretokenized_sources_must_state_their_tokenizer(tmp_path):
    p = tmp_path / "train.bin"
    np.arange(1000, dtype=np.uint16).tofile(p)
    with pytest.raises(
        SourceError, match=r"source 't': format: tokens holds token ids but does not say which tokenizer"
    ):
        _dm(tmp_path, SourceSpec("t", [str(p)], format="tokens", dtype="uint16"))
    with pytest.raises(SourceError, match=r"source 't': format: tokens needs dtype: one of \['uint16', 'uint32'\]"):
        _dm(tmp_path, SourceSpec("t", [str(p)], format="tokens", tokenizer="byte"))


def test_the_checks_read_only_a_prefix(tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:  # 64 MiB of text: a full pass would take far longer than the bound below
        f.write(b"hello world, this is plain text.\n" * (2 << 20))
    import time

    from lightning_nexus.data.sources import check_source_data

    t0 = time.perf_counter()
    check_source_data(SourceSpec("big", [str(big)]))
    assert time.perf_counter() - t0 < 0.5
    assert os.path.getsize(big) > 1000 * PREFIX_BYTES


@pytest.mark.slow
def test_cli_prints_a_one_line_error_naming_the_source(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("hello " * 100)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "data:\n  class_path: lightning_nexus.data.MixedSourceDataModule\n  init_args:\n    sources:\n"
        f"      - {{name: web, paths: [{p}], role: trian}}\n"
    )
    cmd = [sys.executable, "-m", "lightning_nexus", "fit", "--config", "recipes/quickstart.yaml", "--config", str(cfg)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    err = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("Seed set")]
    assert err == ["error: source 'web': unknown role 'trian'; use one of ['train', 'ood']"], proc.stderr[-2000:]
