"""``python -m distlab.comm_check``: the entry point of ``distlab.report.comm_check``."""

from distlab.cli import run_cli
from distlab.report.comm_check import main

if __name__ == "__main__":
    run_cli(main)
