"""Embedded corpus: reproducible bytes, distinct sources, caching, and crash/corruption safety."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from lightning_nexus.data import CorruptCacheError, build_embedded_corpus
from lightning_nexus.data import corpus as corpus_mod
from lightning_nexus.data.store import TokenStream

SMALL = 30_000


def _tree_hashes(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_embedded_corpus(tmp_path_factory.mktemp("a"), max_bytes_per_source=SMALL, verbose=False)


def test_sources_and_roles(built):
    names = [s.name for s in built.sources]
    roles = {s.name: s.role for s in built.sources}
    assert names[:4] == ["code", "prose", "math", "formal"]
    assert sum(r == "train" for r in roles.values()) >= 4
    assert sum(r == "ood" for r in roles.values()) >= 1 and roles["grammar_ood"] == "ood"
    assert built.vocab_size == 256
    for s in built.sources:
        assert 0.5 * SMALL <= s.num_tokens <= 1.1 * SMALL  # byte budget respected, nothing empty
        assert TokenStream(s.path).num_tokens == s.num_tokens


def test_built_twice_identical_bytes(built, tmp_path):
    again = build_embedded_corpus(tmp_path, max_bytes_per_source=SMALL, verbose=False)
    assert again.root.name == built.root.name
    assert _tree_hashes(again.root) == _tree_hashes(built.root)


def test_sources_are_different(built):
    hists = {}
    for s in built.sources:
        st = TokenStream(s.path)
        buf = np.empty(st.num_tokens, dtype=np.int64)
        st.read(0, st.num_tokens, buf)
        hists[s.name] = np.bincount(buf, minlength=256) / buf.size
    names = list(hists)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            tv = 0.5 * np.abs(hists[a] - hists[b]).sum()
            # the two grammars share an alphabet by design, so their byte histograms are closest
            assert tv > (0.03 if {a, b} == {"formal", "grammar_ood"} else 0.1), (a, b, tv)


def test_cache_reused_and_keyed_by_version(built, monkeypatch, capsys):
    cache = built.root.parent
    mtime = os.stat(built.root / "manifest.json").st_mtime_ns
    again = build_embedded_corpus(cache, max_bytes_per_source=SMALL, verbose=True)
    assert again.root == built.root
    assert os.stat(built.root / "manifest.json").st_mtime_ns == mtime
    assert "using cached corpus" in capsys.readouterr().err
    monkeypatch.setattr(corpus_mod, "CORPUS_VERSION", "999")
    bumped = build_embedded_corpus(cache, max_bytes_per_source=SMALL, verbose=False)
    assert bumped.root != built.root and "v999" in bumped.root.name


def test_env_var_sets_default_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTNING_NEXUS_CACHE", str(tmp_path / "x"))
    assert corpus_mod.default_cache_dir() == tmp_path / "x"


def test_interrupted_build_is_not_mistaken_for_complete(tmp_path, monkeypatch):
    import lightning_nexus.data.corpus as c

    calls = {"n": 0}
    real = c.write_token_dir

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # e.g. Ctrl-C half-way through the build
        return real(*args, **kwargs)

    monkeypatch.setattr(c, "write_token_dir", dying)
    with pytest.raises(KeyboardInterrupt):
        build_embedded_corpus(tmp_path, max_bytes_per_source=SMALL, verbose=False)
    assert not any(p.name.startswith("corpus-") for p in tmp_path.iterdir())  # temp dir cleaned, nothing final
    monkeypatch.setattr(c, "write_token_dir", real)
    ok = build_embedded_corpus(tmp_path, max_bytes_per_source=SMALL, verbose=False)
    assert len(ok.sources) >= 5


def test_corrupt_cache_raises_with_fix(built, tmp_path):
    import shutil

    root = tmp_path / built.root.name
    shutil.copytree(built.root, root)
    chunk = next((root / "math" / "data").glob("chunk-*.bin"))
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match=r"math.*delete .* rebuild"):
        build_embedded_corpus(tmp_path, max_bytes_per_source=SMALL, verbose=False)
    chunk.unlink()
    with pytest.raises(CorruptCacheError, match="missing"):
        build_embedded_corpus(tmp_path, max_bytes_per_source=SMALL, verbose=False)
    (root / "manifest.json").unlink()  # e.g. a directory copied half-way by hand
    with pytest.raises(CorruptCacheError, match="interrupted"):
        build_embedded_corpus(tmp_path, max_bytes_per_source=SMALL, verbose=False)


def test_bpe_tokenizer_option(tmp_path):
    pytest.importorskip("tokenizers")
    c = build_embedded_corpus(tmp_path, max_bytes_per_source=SMALL, tokenizer="bpe", bpe_vocab_size=400, verbose=False)
    assert 256 < c.vocab_size <= 400
    st = TokenStream(c.sources[0].path)
    assert st.max_token() < c.vocab_size
    assert st.num_tokens < SMALL  # merges compress the byte stream


def test_building_leaves_the_global_random_state_alone(tmp_path):
    """A cold build must not shift seeded model init: the same seed gives the same run, cache or not."""
    import random

    import torch

    from lightning_nexus.data.store import write_token_dir

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    expected = draws()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    write_token_dir(tmp_path / "tokens", np.arange(5000, dtype=np.uint16) % 256, {"name": "probe"}, chunk_tokens=1024)
    assert draws() == expected
