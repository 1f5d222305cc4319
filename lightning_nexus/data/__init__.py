"""Mixed-source data for Nexus: embedded offline corpus, user sources, per-source micro-batches."""

from lightning_nexus.data.corpus import EmbeddedCorpus, build_embedded_corpus, default_cache_dir
from lightning_nexus.data.datamodule import MixedSourceDataModule
from lightning_nexus.data.schedule import SourceSchedule
from lightning_nexus.data.sources import SourceError, SourceSpec
from lightning_nexus.data.store import CorruptCacheError

__all__ = [
    "CorruptCacheError",
    "EmbeddedCorpus",
    "MixedSourceDataModule",
    "SourceError",
    "SourceSchedule",
    "SourceSpec",
    "build_embedded_corpus",
    "default_cache_dir",
]
