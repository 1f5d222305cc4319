"""Nexus optimizer for PyTorch Lightning: same pretraining loss, a minimum shared by all data sources."""

from lightning_nexus.callback import DEFAULT_INNER_LR, NexusCallback
from lightning_nexus.core import Nexus, WindowResult
from lightning_nexus.monitor import GradSimilarityMonitor
from lightning_nexus.strategies import NexusDDPStrategy, NexusFSDPStrategy, register_strategies

register_strategies()

__all__ = [
    "DEFAULT_INNER_LR", "GradSimilarityMonitor", "Nexus", "NexusCallback", "NexusDDPStrategy",
    "NexusFSDPStrategy", "WindowResult",
]
__version__ = "0.1.0"
