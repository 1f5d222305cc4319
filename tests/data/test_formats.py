"""format: parquet / arrow / tokens, pretrained tokenizer.json files, and the tokenizer agreement checks.
Every stream is compared with a reference built here from the raw data (not through the code under test)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_nexus.data import MixedSourceDataModule, SourceError, SourceSpec

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[2]
DOCS = [f"document number {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(300)]


def _bytes_reference(docs: list[str]) -> np.ndarray:
    return np.frombuffer(b"".join(d.encode() + b"\0" for d in docs), dtype=np.uint8).astype(np.int64)


def _dm(tmp_path, *specs, **kw) -> MixedSourceDataModule:
    kw = {"block_size": 16, "batch_size": 2, "val_batches_per_source": 1, **kw}
    return MixedSourceDataModule(sources=list(specs), cache_dir=str(tmp_path / "cache"), **kw)


def _stream_tokens(dm: MixedSourceDataModule, name: str) -> np.ndarray:
    res = dm._resolve()
    stream = next(e[2] for e in res["train"] + res["ood"] if e[0] == name)
    out = np.empty(stream.num_tokens, dtype=np.int64)
    stream.read(0, stream.num_tokens, out)
    return out


def _write_parquet(tmp_path: Path) -> Path:
    d = tmp_path / "pq"
    d.mkdir()
    half = len(DOCS) // 2
    for i, part in enumerate((DOCS[:half], DOCS[half:])):
        table = pa.table({"id": list(range(len(part))), "content": part})
        pq.write_table(table, d / f"part-{i}.parquet", row_group_size=40)  # several row groups per file
    (d / "README.md").write_text("not data")  # dataset dirs carry such files: not read as parquet
    return d


def test_parquet_streams_row_groups_into_the_same_tokens(tmp_path, monkeypatch):
    d = _write_parquet(tmp_path)

    def whole(*a, **k):
        raise AssertionError("a parquet source must be streamed by row groups, never read whole")

    monkeypatch.setattr(pq, "read_table", whole)
    monkeypatch.setattr(pq.ParquetFile, "read", whole)
    dm = _dm(tmp_path, SourceSpec("web", [str(d)], format="parquet", field="content"))
    dm.prepare_data()
    np.testing.assert_array_equal(_stream_tokens(dm, "web"), _bytes_reference(DOCS))
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 16)


def test_parquet_refusals(tmp_path):
    d = _write_parquet(tmp_path)
    with pytest.raises(SourceError, match=r"source 'web': .*part-0.parquet has no column 'text' .*set field"):
        _dm(tmp_path, SourceSpec("web", [str(d)], format="parquet")).prepare_data()
    with pytest.raises(SourceError, match=r"column 'id' of .*part-0.parquet is int64, not a string"):
        _dm(tmp_path, SourceSpec("web", [str(d)], format="parquet", field="id")).prepare_data()
    pq.write_table(pa.table({"text": ["ok", None, "ok"]}), tmp_path / "null.parquet")
    with pytest.raises(SourceError, match=r"null.parquet row 1 has 'text': null"):
        _dm(tmp_path, SourceSpec("n", [str(tmp_path / "null.parquet")], format="parquet")).prepare_data()
    (tmp_path / "fake.parquet").write_text("hello")
    with pytest.raises(SourceError, match=r"fake.parquet is not a Parquet file"):
        _dm(tmp_path, SourceSpec("f", [str(tmp_path / "fake.parquet")], format="parquet")).prepare_data()


def test_arrow_save_to_disk_dir(tmp_path):
    datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))}).save_to_disk(str(tmp_path / "hf"))
    dm = _dm(tmp_path, SourceSpec("hf", [str(tmp_path / "hf")], format="arrow"))
    dm.prepare_data()
    np.testing.assert_array_equal(_stream_tokens(dm, "hf"), _bytes_reference(DOCS))
    split = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS})})
    split.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(
        SourceError, match=r"source 'dd': .*is a DatasetDict with splits \['train'\]; point paths at one"
    ):
        _dm(tmp_path, SourceSpec("dd", [str(tmp_path / "dd")], format="arrow")).prepare_data()
    with pytest.raises(SourceError, match=r"column 'n' of .* is int64, not a string"):
        _dm(tmp_path, SourceSpec("hf", [str(tmp_path / "hf")], format="arrow", field="n")).prepare_data()


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_tokens_file_is_read_in_place(tmp_path, dtype):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, n).astype(dtype) for n in (3000, 1700)]
    for i, p in enumerate(parts):
        p.tofile(tmp_path / f"train{i}.bin")
    ref = np.concatenate(parts).astype(np.int64)
    spec = SourceSpec("owt", [str(tmp_path / "train*.bin")], format="tokens", dtype=dtype, tokenizer="byte")
    dm = _dm(tmp_path, spec)
    dm.prepare_data()
    np.testing.assert_array_equal(_stream_tokens(dm, "owt"), ref)
    assert not (tmp_path / "cache" / "sources").exists()  # no copy into the cache
    batch = next(iter(dm.train_dataloader()))
    for row_in, row_lab in zip(batch["input_ids"].numpy(), batch["labels"].numpy()):
        window = np.concatenate([row_in, row_lab[-1:]])
        windows = np.lib.stride_tricks.sliding_window_view(ref, 17)
        assert (windows == window).all(axis=1).any(), "every row is 17 contiguous tokens of the file"


def test_tokens_refusals(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(SourceError, match=r"odd.bin has 3 bytes, not a multiple of 2 \(uint16\); is dtype right"):
        _dm(
            tmp_path, SourceSpec("o", [str(tmp_path / "odd.bin")], format="tokens", dtype="uint16", tokenizer="byte")
        ).setup()
    np.save(tmp_path / "ids.npy", np.arange(500, dtype=np.uint16))
    with pytest.raises(SourceError, match=r"ids.npy is a NumPy .npy array, not raw token ids; .*tofile"):
        _dm(
            tmp_path, SourceSpec("n", [str(tmp_path / "ids.npy")], format="tokens", dtype="uint16", tokenizer="byte")
        ).setup()


def _tokenizer_json(tmp_path: Path, vocab: int = 300) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<pad>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(DOCS, trainer=trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_pretrained_tokenizer_json_is_used_and_recorded(tmp_path):
    path = _tokenizer_json(tmp_path)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    dm = _dm(tmp_path, SourceSpec("j", [str(tmp_path / "docs.jsonl")], format="jsonl"), tokenizer=str(path))
    dm.prepare_data()
    ref_tok = tokenizers.Tokenizer.from_file(str(path))
    eod = ref_tok.token_to_id("<|endoftext|>")
    ref = np.concatenate([np.asarray(e.ids + [eod]) for e in ref_tok.encode_batch(DOCS)])
    np.testing.assert_array_equal(_stream_tokens(dm, "j"), ref)
    record = dm.source_tokenizers["j"]
    assert (record.kind, record.vocab_size) == ("hf", ref_tok.get_vocab_size())
    assert record.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert dm.vocab_size == ref_tok.get_vocab_size()
    manifest = json.loads(next((tmp_path / "cache" / "sources").glob("j-*/manifest.json")).read_text())
    assert manifest["tokenizer"]["sha256"] == record.sha256


def test_sources_with_different_tokenizers_are_refused_naming_both(tmp_path):
    path = _tokenizer_json(tmp_path)
    (tmp_path / "a.txt").write_text(" ".join(DOCS))
    ids = tmp_path / "ids.bin"
    (np.arange(2000) % 250).astype(np.uint16).tofile(ids)
    text = SourceSpec("prose", [str(tmp_path / "a.txt")])
    # byte-tokenized text next to ids from the tokenizer.json
    gpt = SourceSpec("owt", [str(ids)], format="tokens", dtype="uint16", tokenizer=str(path))
    with pytest.raises(
        SourceError, match=r"sources 'prose' and 'owt' use different tokenizers: byte \(vocab 256\) vs hf"
    ):
        _dm(tmp_path, text, gpt).prepare_data()
    named = SourceSpec("owt", [str(ids)], format="tokens", dtype="uint16", tokenizer="gpt2")
    with pytest.raises(SourceError, match=r"sources 'prose' and 'owt' use different tokenizers: .* vs 'gpt2'"):
        _dm(tmp_path, text, named).prepare_data()
    # the same tokenizer on both sides is accepted
    dm = _dm(tmp_path, text, gpt, tokenizer=str(path))
    dm.prepare_data()
    assert dm.source_tokenizers["prose"] == dm.source_tokenizers["owt"]


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
    ids = tmp_path / "ids.bin"
    np.array([1, 2, 300, 4] * 500, dtype=np.uint16).tofile(ids)
    spec = SourceSpec("t", [str(ids)], format="tokens", dtype="uint16", tokenizer="byte")
    with pytest.raises(
        SourceError, match=r"source 't' contains token id 300 but its tokenizer byte \(vocab 256\) has 256"
    ):
        _dm(tmp_path, spec).prepare_data()
    named = SourceSpec("t", [str(ids)], format="tokens", dtype="uint16", tokenizer="gpt2")
    with pytest.raises(SourceError, match=r"set vocab_size >= 301"):
        _dm(tmp_path, named).prepare_data()
    dm = _dm(tmp_path, named, vocab_size=512)
    dm.prepare_data()
    assert dm.vocab_size == 512 and dm.max_token_ids == {"t": 300}


def test_missing_optional_dependency_names_the_extra(tmp_path, monkeypatch):
    d = _write_parquet(tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'lightning-nexus\[formats\]'"):
        _dm(tmp_path, SourceSpec("web", [str(d)], format="parquet", field="content")).prepare_data()


@pytest.mark.slow
def test_every_format_trains_through_the_cli(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d = _write_parquet(tmp_path)
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "hf"))
    _bytes_reference(DOCS).astype(np.uint16).tofile(tmp_path / "train.bin")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    sources = [
        {"name": "pq", "paths": [str(d)], "format": "parquet", "field": "content"},
        {"name": "hf", "paths": [str(tmp_path / "hf")], "format": "arrow"},
        {
            "name": "bin",
            "paths": [str(tmp_path / "train.bin")],
            "format": "tokens",
            "dtype": "uint16",
            "tokenizer": "byte",
        },
        {"name": "js", "paths": [str(tmp_path / "docs.jsonl")], "format": "jsonl", "jsonl_field": "body"},
    ]
    cfg = tmp_path / "data.yaml"
    cfg.write_text(json.dumps({"data": {"init_args": {"sources": sources}}}))  # JSON is YAML
    cmd = [sys.executable, "-m", "lightning_nexus", "fit", "--config", "recipes/quickstart.yaml", "--config", str(cfg)]
    cmd += ["--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "8"]
    cmd += ["--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    cmd += ["--data.init_args.cache_dir", str(tmp_path / "cache"), "--data.init_args.block_size", "32"]
    cmd += ["--data.init_args.batch_size", "2", "--data.init_args.val_batches_per_source", "1"]
    cmd += ["--data.init_args.schedule", "round_robin"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = EventAccumulator(str(next((tmp_path / "runs" / "quickstart").glob("version_*"))))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("pq", "hf", "bin", "js"):
        assert f"train/loss/{name}" in tags and f"val/loss/{name}" in tags, sorted(tags)
        assert f"nexus/grad_norm/{name}" in tags, sorted(tags)


def test_tokenizer_json_needs_own_sources():
    with pytest.raises(ValueError, match=r"the embedded corpus is tokenized with 'byte' or 'bpe'"):
        MixedSourceDataModule(tokenizer="/models/gpt2/tokenizer.json")
