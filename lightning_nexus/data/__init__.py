"""Mixed-source data for Nexus: embedded offline corpus, user sources, per-source micro-batches."""

from lightning_nexus.data.corpus import EmbeddedCorpus, build_embedded_corpus, default_cache_dir
from lightning_nexus.data.datamodule import MixedSourceDataModule
from lightning_nexus.data.errors import SourceError
from lightning_nexus.data.per_source import PerSourceDataLoader, per_source_dataloader
from lightning_nexus.data.schedule import SourceSchedule
from lightning_nexus.data.sources import SourceSpec
from lightning_nexus.data.store import CorruptCacheError

__all__ = [
    "CorruptCacheError",
    "EmbeddedCorpus",
    "MixedSourceDataModule",
    "PerSourceDataLoader",
    "SourceError",
    "SourceSchedule",
    "SourceSpec",
    "build_embedded_corpus",
    "default_cache_dir",
    "per_source_dataloader",
]
