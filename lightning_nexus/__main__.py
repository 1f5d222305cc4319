"""``python -m lightning_nexus`` is the ``lightning-nexus`` command."""

from lightning_nexus.cli import main

main()
