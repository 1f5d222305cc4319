"""per_source_dataloader: one source per batch, same sources on every rank with disjoint samples,
the DataModule's schedules, exact resume through Lightning checkpoints, names in the monitor's tags."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import IterableDataset

from lightning_nexus import NexusCallback
from lightning_nexus.data import per_source_dataloader
from lightning_nexus.monitor import GradSimilarityMonitor

SIZES = {"alpha": 40, "beta": 24, "gamma": 32}


def _datasets(sizes=SIZES):
    # every sample says which source it is from and which sample it is, independently of the loader
    return {
        name: [{"x": torch.tensor([float(k), float(i)]), "tag": k * 1000 + i} for i in range(n)]
        for k, (name, n) in enumerate(sizes.items())
    }


def _tags(batch) -> list[int]:
    return batch["tag"].tolist()


def test_every_batch_is_one_source_and_source_id_names_it():
    loader = per_source_dataloader(_datasets(), batch_size=4, seed=3)
    assert loader.source_names == list(SIZES)
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    for b in batches:
        sources = {t // 1000 for t in _tags(b)}
        assert len(sources) == 1, _tags(b)  # purity
        assert b["source_id"].tolist() == [sources.pop()] * 4  # source_id indexes source_names
    # one epoch never repeats a sample
    seen = [t for b in batches for t in _tags(b)]
    assert len(seen) == len(set(seen))


def test_round_robin_covers_all_sources_in_every_window():
    loader = per_source_dataloader(_datasets(), batch_size=2, schedule="round_robin")
    order = [int(b["source_id"][0]) for b in loader]
    assert len(order) >= 6
    for i in range(len(order) - 2):
        assert sorted(order[i : i + 3]) == [0, 1, 2], order


def test_weighted_schedule_keeps_the_weights_exactly_per_period():
    sizes = {"a": 400, "b": 400}
    loader = per_source_dataloader(_datasets(sizes), batch_size=2, weights={"a": 3, "b": 1}, seed=1)
    order = [int(b["source_id"][0]) for b in loader]
    for p in range(len(order) // 4):
        assert sorted(order[4 * p : 4 * p + 4]) == [0, 0, 0, 1]
    assert order[:8] != [0, 0, 0, 1] * 2  # shuffled within periods, not a fixed pattern


def test_two_ranks_same_sources_disjoint_samples():
    loaders = [per_source_dataloader(_datasets(), 3, num_replicas=2, rank=r, seed=5) for r in (0, 1)]
    b0, b1 = list(loaders[0]), list(loaders[1])
    assert len(b0) == len(b1) > 0
    for x, y in zip(b0, b1):
        assert x["source_id"][0] == y["source_id"][0]  # ranks agree on the source of batch i
        assert not set(_tags(x)) & set(_tags(y))
    all_tags = [t for b in b0 + b1 for t in _tags(b)]
    assert len(all_tags) == len(set(all_tags))  # disjoint over the whole epoch too


def test_epochs_differ_and_workers_give_the_same_stream():
    loader = per_source_dataloader(_datasets(), batch_size=4, seed=2)
    e0, e1 = [_tags(b) for b in loader], [_tags(b) for b in loader]
    assert e0 != e1
    with_workers = per_source_dataloader(_datasets(), batch_size=4, seed=2, num_workers=2)
    assert [_tags(b) for b in with_workers] == e0


def test_state_dict_resumes_mid_epoch_without_a_trainer():
    ref_loader = per_source_dataloader(_datasets(), batch_size=4, seed=7)
    ref = [_tags(b) for b in ref_loader] + [_tags(b) for b in ref_loader]
    loader = per_source_dataloader(_datasets(), batch_size=4, seed=7)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    fresh = per_source_dataloader(_datasets(), batch_size=4, seed=7)
    fresh.load_state_dict(state)
    rest = [_tags(b) for b in fresh] + [_tags(b) for b in fresh]
    assert rest == ref[3:]


def test_hugging_face_dataset_as_a_source():
    datasets = pytest.importorskip("datasets")
    hf = datasets.Dataset.from_dict({"tag": list(range(16)), "x": [[float(i), 0.0] for i in range(16)]})
    hf = hf.with_format("torch")
    loader = per_source_dataloader({"hf": hf, "own": _datasets({"own": 16})["own"]}, batch_size=4, seed=0)
    names = [loader.source_names[int(b["source_id"][0])] for b in loader]
    assert set(names) == {"hf", "own"}
    hf_tags = [t for b in loader if int(b["source_id"][0]) == 0 for t in _tags(b)]
    assert hf_tags and all(0 <= t < 16 for t in hf_tags)


class _Stream(IterableDataset):
    def __init__(self, k: int, n: int) -> None:
        self.k, self.n = k, n

    def __iter__(self):
        for i in range(self.n):
            yield {"tag": self.k * 1000 + i}


def test_iterable_sources_ranks_passes_and_resume():
    def make(rank):
        streams = {"s": _Stream(0, 30), "t": _Stream(1, 50)}
        return per_source_dataloader(streams, 2, num_replicas=2, rank=rank, batches_per_epoch=10)

    loaders = make(0), make(1)
    r0, r1 = ([_tags(b) for b in loader] + [_tags(b) for b in loader] for loader in loaders)  # two epochs
    assert len(r0) == len(r1) == 20
    for x, y in zip(r0, r1):
        assert {t // 1000 for t in x} == {t // 1000 for t in y} and len({t // 1000 for t in x}) == 1
        assert not set(x) & set(y)
    # each use of a source takes the next B * world items of its stream; an exhausted stream starts over
    used = {}
    for k, n in ((0, 30), (1, 50)):
        used[k] = [t % 1000 for x, y in zip(r0, r1) if x[0] // 1000 == k for t in x + y]
        assert used[k] == [i % n for i in range(len(used[k]))]
    assert len(used[0]) > 30  # source s ran out and started its second pass
    loader = make(0)
    it = iter(loader)
    for _ in range(4):
        next(it)
    resumed = make(0)
    resumed.load_state_dict(loader.state_dict())
    assert [_tags(b) for b in resumed] + [_tags(b) for b in resumed] == r0[4:]
    with pytest.raises(ValueError, match="iterable datasets have no length: pass batches_per_epoch"):
        per_source_dataloader({"s": _Stream(0, 30)}, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"weights": [1, 0, 1]}, "source 'beta': weight 0.0 must be a finite number > 0"),
        ({"weights": [1, 1]}, "2 weights for 3 sources"),
        ({"shuffle": True}, "decides 'shuffle' itself"),
        ({"batch_size": 30}, "source 'beta' has 24 samples, fewer than one batch of 30"),
        ({"rank": 2, "num_replicas": 2}, "need 0 <= rank < num_replicas"),
    ],
)
def test_refusals(kwargs, match):
    kw = {"batch_size": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        per_source_dataloader(_datasets(), **kw)


# ---- inside Lightning: checkpoints carry the loader state; the monitor names the sources ----------


class _Recorder(LightningModule):
    def __init__(self, workers: int | str = 0) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        self.workers = workers
        self.seen: list[list[int]] = []

    def train_dataloader(self):
        if self.workers == "stream":
            streams = {"s": _Stream(0, 30), "t": _Stream(1, 50)}
            return per_source_dataloader(streams, batch_size=4, seed=11, batches_per_epoch=10)
        return per_source_dataloader(_datasets(), batch_size=4, seed=11, num_workers=self.workers)

    def training_step(self, batch, batch_idx):
        self.seen.append(_tags(batch))
        x = batch["x"] if "x" in batch else batch["tag"].float().unsqueeze(-1).repeat(1, 2)
        return self.lin(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(root, **kw) -> Trainer:
    return Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=3,
        **kw,
    )


@pytest.mark.parametrize("workers", [0, 2, "stream"])
def test_exact_resume_through_a_lightning_checkpoint(tmp_path, workers):
    full = _Recorder(workers)
    _trainer(tmp_path / "full", max_epochs=2, enable_checkpointing=False).fit(full)
    per_epoch = len(full.seen) // 2
    assert per_epoch > 6  # the checkpoint below (after 6 batches) is mid-epoch

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1)
    first = _Recorder(workers)
    _trainer(tmp_path / "a", max_epochs=2, max_steps=2, callbacks=[ckpt]).fit(first)
    path = next((tmp_path / "ck").glob("*step=2*.ckpt"))
    state = torch.load(path, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state == [{"epoch": 0, "batches": 6}]
    second = _Recorder(workers)
    _trainer(tmp_path / "b", max_epochs=2, enable_checkpointing=False).fit(second, ckpt_path=path)
    assert first.seen == full.seen[:6]
    assert second.seen == full.seen[6:]


class _Logged(_Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.logged: set[str] = set()

    def train_dataloader(self):
        return per_source_dataloader(_datasets(), batch_size=4, schedule="round_robin")

    def log(self, name, *args, **kwargs):
        self.logged.add(name)
        return super().log(name, *args, **kwargs)


def test_monitor_tags_use_the_loader_source_names(tmp_path):
    module = _Logged()
    monitor = GradSimilarityMonitor(mode="exact", every_n_steps=1)
    trainer = _trainer(tmp_path, max_steps=2, enable_checkpointing=False, log_every_n_steps=1)
    trainer.callbacks.extend([NexusCallback(inner_lr=0.01), monitor])
    trainer.fit(module)
    cosines = {t for t in module.logged if t.startswith("nexus/grad_cosine/") and t != "nexus/grad_cosine/mean"}
    assert cosines == {
        "nexus/grad_cosine/alpha__beta",
        "nexus/grad_cosine/alpha__gamma",
        "nexus/grad_cosine/beta__gamma",
    }
    assert not any("source0" in t for t in module.logged)


def test_ranks_default_to_the_process_group(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    implicit = [_tags(b) for b in per_source_dataloader(_datasets(), 3, seed=5)]
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    explicit = [_tags(b) for b in per_source_dataloader(_datasets(), 3, seed=5, num_replicas=2, rank=1)]
    alone = [_tags(b) for b in per_source_dataloader(_datasets(), 3, seed=5)]
    assert implicit == explicit != alone
