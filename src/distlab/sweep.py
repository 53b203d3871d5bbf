"""``python -m distlab.sweep``: the entry point of ``distlab.report.sweep`` (see there)."""

from distlab.cli import run_cli
from distlab.report.sweep import main

if __name__ == "__main__":
    run_cli(main)
