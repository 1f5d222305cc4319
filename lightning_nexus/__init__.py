"""Nexus optimizer for PyTorch Lightning: same pretraining loss, a minimum shared by all data sources.

The names below load on first use, so ``import lightning_nexus.core`` (pure torch) does not import
Lightning. Importing the strategies module (which ``NexusCallback`` does) registers the strategy names
``nexus_ddp``, ``nexus_ddp_window``, ``nexus_ddp_spawn`` and ``nexus_fsdp`` with Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "DEFAULT_INNER_LR": "lightning_nexus.callback",
    "NexusCallback": "lightning_nexus.callback",
    "Nexus": "lightning_nexus.core",
    "WindowResult": "lightning_nexus.core",
    "GradSimilarityMonitor": "lightning_nexus.monitor",
    "NexusDDPStrategy": "lightning_nexus.strategies",
    "NexusFSDPStrategy": "lightning_nexus.strategies",
    "register_strategies": "lightning_nexus.strategies",
}

__all__ = [
    "DEFAULT_INNER_LR",
    "GradSimilarityMonitor",
    "Nexus",
    "NexusCallback",
    "NexusDDPStrategy",
    "NexusFSDPStrategy",
    "WindowResult",
    "register_strategies",
]

if TYPE_CHECKING:
    from lightning_nexus.callback import DEFAULT_INNER_LR, NexusCallback
    from lightning_nexus.core import Nexus, WindowResult
    from lightning_nexus.monitor import GradSimilarityMonitor
    from lightning_nexus.strategies import NexusDDPStrategy, NexusFSDPStrategy, register_strategies


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_nexus' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
