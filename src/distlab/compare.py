"""``python -m distlab.compare``: the entry point of ``distlab.report.compare`` (see there)."""

from distlab.cli import run_cli
from distlab.report.compare import main

if __name__ == "__main__":
    run_cli(main)
