"""``python -m distlab.verify``: the entry point of ``distlab.report.verify`` (see there)."""

from distlab.cli import run_cli
from distlab.report.verify import main

if __name__ == "__main__":
    run_cli(main)
