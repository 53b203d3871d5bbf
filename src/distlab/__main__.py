"""``distlab COMMAND ...`` (or ``python -m distlab COMMAND``): one entry point for every command.

distlab launch --strategy fsdp --nproc 4      (= python -m distlab.launch ...)
distlab verify --strategy tp --nproc 2        (= python -m distlab.verify ...)
distlab compare runs/*                        (= python -m distlab.compare ...)
distlab sweep configs/compare.yaml            (= python -m distlab.sweep ...)
distlab comm-check ddp fsdp                   (= python -m distlab.comm_check ...)
distlab plan --model gpt2 --gpus 64           (= python -m distlab.plan ...)
distlab cluster up --nodes 2                  (= python -m distlab.launch.cluster up ...)
distlab export runs/fsdp-n2-... hf_model      (= python -m distlab.export ...)
distlab generate runs/fsdp-n2-... --prompt "def " --tokens 50   (= python -m distlab.generate ...)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import NoReturn

from distlab.cli import run_cli
from distlab.export import main as export
from distlab.generate import main as generate
from distlab.launch.__main__ import main as launch
from distlab.launch.cluster import main as cluster
from distlab.plan.__main__ import main as plan
from distlab.report.comm_check import main as comm_check
from distlab.report.compare import main as compare
from distlab.report.sweep import main as sweep
from distlab.report.verify import main as verify

COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "launch": (launch, "train the GPT with a parallelism strategy"),
    "verify": (verify, "check a strategy's parity with the single-process run"),
    "compare": (compare, "runs side by side, measured against theory"),
    "sweep": (sweep, "run a matrix of strategies x world sizes, then report"),
    "comm-check": (comm_check, "counted communication vs theory vs the kernel's TCP bytes"),
    "plan": (plan, "which layout, memory per GPU and speed for a model on a cluster"),
    "cluster": (cluster, "a Ray cluster of several nodes on this machine: up, status, down"),
    "export": (export, "a run's newest checkpoint as a Hugging Face GPT-2 directory"),
    "generate": (generate, "sample text from a run's newest checkpoint"),
}


def usage() -> str:
    """The list of commands."""
    rows = "\n".join(f"  {name:11s} {summary}" for name, (_, summary) in COMMANDS.items())
    return f"usage: distlab COMMAND [ARGS...]   (distlab COMMAND --help for its flags)\n\n{rows}\n"


def main(argv: list[str] | None = None) -> NoReturn:
    """Run ``distlab COMMAND ARGS...``; a one-line error for an unknown command."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        sys.exit(0 if args else 2)
    if args[0] not in COMMANDS:
        sys.stderr.write(
            f"distlab: error: unknown command '{args[0]}' (choose one of: {', '.join(COMMANDS)})\n"
        )
        sys.exit(2)
    command, _ = COMMANDS[args[0]]
    run_cli(partial(command, args[1:]))


if __name__ == "__main__":
    main()
