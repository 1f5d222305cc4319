"""``python -m lightning_nexus_recipes.models --table``: the preset table in Markdown, for the README."""

import argparse

from lightning_nexus_recipes.models import size_table

parser = argparse.ArgumentParser(prog="python -m lightning_nexus_recipes.models", description=__doc__)
parser.add_argument("--table", action="store_true", help="print the Markdown table of model presets")
args = parser.parse_args()
if not args.table:
    parser.print_help()
else:
    print(size_table())
