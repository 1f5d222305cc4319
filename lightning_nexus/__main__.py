"""``python -m lightning_nexus`` is the ``lightning-nexus`` command."""

from lightning_nexus.tools.cli import main

main()
