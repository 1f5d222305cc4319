"""MixedSourceDataModule: batch contract, user sources, validation loaders, and every bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lightning_nexus.data import (
    CorruptCacheError,
    MixedSourceDataModule,
    SourceError,
    SourceSpec,
    build_embedded_corpus,
)

SMALL = 20_000


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    build_embedded_corpus(d, max_bytes_per_source=SMALL, verbose=False)
    return str(d)


def _dm(cache, **kw):
    base = dict(cache_dir=cache, block_size=32, batch_size=4, corpus_bytes_per_source=SMALL, val_batches_per_source=2)
    return MixedSourceDataModule(**{**base, **kw})


def test_batch_contract(cache):
    dm = _dm(cache)
    dm.setup("fit")
    assert dm.source_names == dm.train_source_names + dm.ood_source_names
    assert dm.val_source_names == dm.source_names and dm.vocab_size == 256
    n_train = len(dm.train_source_names)
    batches = list(dm.train_dataloader())
    for b in batches:
        assert set(b) == {"input_ids", "labels", "source_id"}
        assert b["input_ids"].shape == b["labels"].shape == (4, 32) and b["input_ids"].dtype == torch.long
        assert b["source_id"].shape == (4,)
        assert torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:])
        assert len(set(b["source_id"].tolist())) == 1 and 0 <= int(b["source_id"][0]) < n_train
    # round robin over equal weights: every window of n_train micro-batches has all train sources
    ids = [int(b["source_id"][0]) for b in batches]
    assert all(len(set(ids[i : i + n_train])) == n_train for i in range(len(ids) - n_train))


def test_workers_do_not_change_batches(cache):
    a = list(_dm(cache, num_workers=0, train_batches_per_epoch=10).train_dataloader())
    b = list(_dm(cache, num_workers=2, train_batches_per_epoch=10).train_dataloader())
    assert len(a) == len(b) == 10
    assert all(
        torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["source_id"], y["source_id"])
        for x, y in zip(a, b)
    )


def test_seed_changes_order(cache):
    a = next(iter(_dm(cache, seed=0).train_dataloader()))["input_ids"]
    b = next(iter(_dm(cache, seed=1).train_dataloader()))["input_ids"]
    assert not torch.equal(a, b)


def test_val_loaders_held_out(cache):
    dm = _dm(cache)
    vals = dm.val_dataloader()
    assert len(vals) == len(dm.val_source_names)
    ds = dm.train_dataset()
    for sid, loader in enumerate(vals):
        batches = list(loader)
        assert len(batches) == 2 and all(int(b["source_id"][0]) == sid for b in batches)
    # the last train block ends before the held-out tail (2 batches x 4 blocks) of each train source
    for s, picker in enumerate(ds.pickers):
        assert picker.n * ds.seq <= ds.streams[s].num_tokens - 2 * 4 * ds.seq


def test_val_split_across_ranks(cache):
    seen = []
    for rank in (0, 1):
        dm = _dm(cache, val_batches_per_source=4)
        dm.set_distributed(rank, 2)
        seen.append([b["input_ids"] for b in dm.val_dataloader()[0]])
    assert len(seen[0]) == len(seen[1]) == 2
    assert not any(torch.equal(a, b) for a in seen[0] for b in seen[1])


def test_sample_mixing_and_weights(cache):
    dm = _dm(cache, mixing="sample", schedule="weighted", train_batches_per_epoch=40)
    ids = torch.cat([b["source_id"] for b in dm.train_dataloader()])
    assert len(set(ids.tolist())) == 4


def test_user_sources_text_jsonl_litdata(tmp_path):
    from litdata import optimize  # noqa: F401  (litdata input is produced below via our own writer)

    from lightning_nexus.data.store import write_token_dir

    (tmp_path / "t").mkdir()
    for i in range(3):
        (tmp_path / "t" / f"{i}.txt").write_text(f"document {i} " * 200)
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(50):
            f.write(json.dumps({"body": f"record {i} " * 20}) + "\n")
    write_token_dir(tmp_path / "lit", np.arange(5000, dtype=np.uint16) % 256, {})
    specs = [
        SourceSpec(name="txt", paths=[str(tmp_path / "t" / "*.txt")]),
        {"name": "js", "paths": [str(tmp_path / "d.jsonl")], "format": "jsonl", "jsonl_field": "body", "weight": 2.0},
        SourceSpec(name="lit", paths=[str(tmp_path / "lit" / "data")], format="litdata", role="ood", tokenizer="byte"),
    ]
    dm = MixedSourceDataModule(
        sources=specs, block_size=16, batch_size=2, cache_dir=str(tmp_path / "c"), val_batches_per_source=1
    )
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_source_names == ["txt", "js"] and dm.ood_source_names == ["lit"]
    ids = [int(b["source_id"][0]) for b in dm.train_dataloader()]
    assert ids.count(1) > 1.5 * ids.count(0)  # weight 2 vs 1
    first = next(iter(dm.val_dataloader()[2]))["input_ids"][0]
    assert torch.equal(first, torch.arange(16))
    b = next(iter(dm.train_dataloader()))
    assert b"document" in bytes(b["input_ids"][0].tolist()) or b"record" in bytes(b["input_ids"][0].tolist())


# ---- bad input: a clear error before training, naming the source and the fix -------------------


def _write(tmp_path, name="a.txt", text="hello world " * 100):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_missing_path(tmp_path):
    with pytest.raises(SourceError, match=r"source 'web'.*does not exist; fix the path"):
        MixedSourceDataModule(
            sources=[SourceSpec("web", [str(tmp_path / "nope.txt")])], cache_dir=str(tmp_path)
        ).setup()
    with pytest.raises(SourceError, match=r"source 'web'.*matches no file"):
        MixedSourceDataModule(sources=[SourceSpec("web", [str(tmp_path / "*.txt")])], cache_dir=str(tmp_path)).setup()


def test_empty_source(tmp_path):
    empty = _write(tmp_path, "e.txt", "")
    with pytest.raises(SourceError, match=r"source 'blank'.*hold no text"):
        MixedSourceDataModule(sources=[SourceSpec("blank", [empty])], cache_dir=str(tmp_path)).setup()
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(SourceError, match=r"source 'd'.*contain no files"):
        MixedSourceDataModule(sources=[SourceSpec("d", [str(tmp_path / "emptydir")])], cache_dir=str(tmp_path)).setup()


@pytest.mark.parametrize("weights", [(0.0, 0.0), (-1.0, 0.0)])
def test_bad_weights(tmp_path, weights):
    p = _write(tmp_path)
    specs = [SourceSpec("a", [p], weight=weights[0]), SourceSpec("b", [p], weight=weights[1])]
    with pytest.raises(SourceError, match=r"weight"):
        MixedSourceDataModule(sources=specs, cache_dir=str(tmp_path))


def test_unknown_role_format_duplicate(tmp_path):
    p = _write(tmp_path)
    with pytest.raises(SourceError, match=r"source 'a': unknown role 'test'; use one of"):
        MixedSourceDataModule(sources=[{"name": "a", "paths": [p], "role": "test"}])
    with pytest.raises(SourceError, match=r"unknown format"):
        MixedSourceDataModule(sources=[{"name": "a", "paths": [p], "format": "csv"}])
    with pytest.raises(SourceError, match=r"listed twice"):
        MixedSourceDataModule(sources=[SourceSpec("a", [p]), SourceSpec("a", [p])])
    with pytest.raises(SourceError, match=r"no source has role 'train'"):
        MixedSourceDataModule(sources=[SourceSpec("a", [p], role="ood")])


def test_block_size_longer_than_stream(tmp_path):
    p = _write(tmp_path, text="short text")
    with pytest.raises(SourceError, match=r"source 'tiny'.*fewer than one block.*lower block_size"):
        MixedSourceDataModule(sources=[SourceSpec("tiny", [p])], block_size=256, cache_dir=str(tmp_path)).setup()
    p2 = _write(tmp_path, "b.txt", "x" * 3000)
    with pytest.raises(SourceError, match=r"source 'mid'.*cannot fill one micro-batch"):
        MixedSourceDataModule(
            sources=[SourceSpec("mid", [p2])], block_size=256, batch_size=8, cache_dir=str(tmp_path)
        ).setup()


def test_bad_jsonl(tmp_path):
    p = _write(tmp_path, "x.jsonl", '{"text": "ok"}\n{"content": "wrong field"}\n')
    with pytest.raises(SourceError, match=r"source 'j'.*x.jsonl:2 has no field 'text'; set field"):
        MixedSourceDataModule(sources=[SourceSpec("j", [p], format="jsonl")], cache_dir=str(tmp_path)).setup()
    p = _write(tmp_path, "y.jsonl", '{"text": "ok"}\nnot json\n')
    with pytest.raises(SourceError, match=r"y.jsonl:2 is not valid JSON"):
        MixedSourceDataModule(sources=[SourceSpec("j2", [p], format="jsonl")], cache_dir=str(tmp_path)).setup()


def test_litdata_dir_that_is_not_litdata(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match=r"source 'l'.*no index.json"):
        MixedSourceDataModule(
            sources=[SourceSpec("l", [str(tmp_path / "d")], format="litdata", tokenizer="byte")],
            cache_dir=str(tmp_path),
        ).setup()


def test_corrupt_user_source_cache(tmp_path):
    p = _write(tmp_path)
    dm = MixedSourceDataModule(
        sources=[SourceSpec("a", [p])], block_size=16, batch_size=2, cache_dir=str(tmp_path / "c")
    )
    dm.setup()
    chunk = next((tmp_path / "c" / "sources").glob("a-*/data/chunk-*.bin"))
    chunk.write_bytes(chunk.read_bytes()[:-3])
    with pytest.raises(CorruptCacheError, match=r"source 'a'.*delete"):
        MixedSourceDataModule(
            sources=[SourceSpec("a", [p])], block_size=16, batch_size=2, cache_dir=str(tmp_path / "c")
        ).setup()


def test_bad_scalar_args():
    with pytest.raises(ValueError, match="block_size"):
        MixedSourceDataModule(block_size=0)
    with pytest.raises(ValueError, match="schedule"):
        MixedSourceDataModule(schedule="random")  # type: ignore[arg-type]
