"""Evidence experiment for Nexus vs AdamW: downstream probes that measure transfer, not memorization,
common-minima diagnostics, and the callback that runs both during ``lightning-nexus experiment``."""

from lightning_nexus_recipes.evidence.callback import EvidenceCallback

__all__ = ["EvidenceCallback"]
