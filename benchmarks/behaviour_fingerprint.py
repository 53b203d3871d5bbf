"""What distlab computes, as one JSON file: for a refactor that must change no behaviour.

Two parts:

- ``runs``: the per-step losses of a fixed list of real runs (the ranks are processes
  on gloo), each loss as ``float.hex`` so that equal means bitwise equal;
- ``theory``: ``distlab.theory.predict`` for every registered strategy over a grid of
  layouts (world sizes, degrees, optimizers, precisions, offload, micro-batches), or
  the one-line error a layout is refused with (a refusal is behaviour too).

Dump it on the old commit, then on the new one, and compare:

    python benchmarks/behaviour_fingerprint.py --out before.json
    python benchmarks/behaviour_fingerprint.py --out after.json --compare before.json

``--theory-only`` skips the runs (seconds instead of minutes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distlab.cli import config_overrides
from distlab.errors import DistlabError
from distlab.launch.__main__ import build_parser
from distlab.strategies import registry
from distlab.strategies.resolve import load_config
from distlab.theory import predict

RUNS: dict[str, list[str]] = {
    "fsdp x4 (defaults: small, 100 steps)": ["--strategy", "fsdp", "--nproc", "4"],
    "ddp x2": ["--strategy", "ddp", "--nproc", "2", "--model", "tiny", "--steps", "10"],
    "tp x2": ["--strategy", "tp", "--nproc", "2", "--model", "tiny", "--steps", "10"],
    "pp x2 1f1b": ["--strategy", "pp", "--nproc", "2", "--schedule", "1f1b"]
    + ["--model", "tiny", "--steps", "10"],
    "hsdp 2x2": ["--strategy", "hsdp", "--nproc", "4", "--dp-replicate", "2"]
    + ["--model", "tiny", "--steps", "10"],
    "ep x2 tiny-moe": ["--strategy", "ep", "--nproc", "2", "--model", "tiny-moe"]
    + ["--steps", "10"],
    "fsdp+cp+tp+pp x16": ["--strategy", "fsdp+cp+tp+pp", "--nproc", "16", "--tp", "2"]
    + ["--pp", "2", "--cp", "2", "--model", "tiny", "--steps", "10"],
}
"""The runs whose losses must not move: the list of the one-mesh redesign's issue."""

GRID: dict[str, list[list[str]]] = {
    "nproc": [["--nproc", "1"], ["--nproc", "2"], ["--nproc", "4"], ["--nproc", "8"]]
    + [["--nproc", "16"]],
    "optimizer": [["--optimizer", "sgd"], ["--optimizer", "adamw"]],
    "precision": [[], ["--precision", "bf16"]],
    "model": [["--model", "tiny"], ["--model", "small"]],
    "degrees": [[], ["--tp", "2"], ["--pp", "2"], ["--cp", "2"], ["--tp", "2", "--pp", "2"]]
    + [
        ["--cp", "2", "--tp", "2"],
        ["--cp", "2", "--pp", "2"],
        ["--cp", "2", "--tp", "2", "--pp", "2"],
    ]
    + [["--dp-replicate", "2"], ["--ep", "2", "--model", "tiny-moe"]],
    "options": [[], ["--offload", "optimizer"], ["--offload", "params"], ["--micro-batch", "1"]]
    + [["--no-reshard-after-forward"], ["--schedule", "zbv"], ["--ac", "full"]],
}
"""The theory grid: every strategy under every combination of one choice per row."""


def theory(strategy: str) -> dict[str, Any]:
    """``predict`` (or the refusal) for ``strategy`` at every point of ``GRID``."""
    out: dict[str, Any] = {}
    parser = build_parser()
    for choice in itertools.product(*GRID.values()):
        flags = ["--strategy", strategy, *itertools.chain.from_iterable(choice)]
        key = " ".join(flags)
        try:
            config = load_config(None, config_overrides(parser.parse_args(flags)))
            out[key] = predict(config)
        except DistlabError as error:
            out[key] = {"refused": str(error)}
    return out


def run_losses(flags: list[str], run_dir: Path) -> list[str]:
    """Train ``flags`` with the local launcher; the losses as ``float.hex``."""
    command = [sys.executable, "-m", "distlab.launch", *flags, "--launcher", "local"]
    command += ["--no-wandb", "--quiet", "--run-dir", str(run_dir)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [float(json.loads(line)["loss"]).hex() for line in lines]


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Every path at which two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = [f"{where}/{k}: only in one" for k in sorted(set(old) ^ set(new))]
        for key in sorted(set(old) & set(new)):
            found += differences(old[key], new[key], f"{where}/{key}")
        return found
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    parser.add_argument("--compare", type=Path, help="an earlier dump: list what differs")
    parser.add_argument("--theory-only", action="store_true", help="skip the runs")
    args = parser.parse_args()
    dump: dict[str, Any] = {"theory": {}, "runs": {}}
    for name in registry.names():
        started = time.monotonic()
        dump["theory"][name] = theory(name)
        print(f"theory {name}: {time.monotonic() - started:.1f} s", file=sys.stderr)
    if not args.theory_only:
        with tempfile.TemporaryDirectory() as scratch:
            for index, (name, flags) in enumerate(RUNS.items()):
                started = time.monotonic()
                dump["runs"][name] = run_losses(flags, Path(scratch) / str(index))
                print(f"run {name}: {time.monotonic() - started:.1f} s", file=sys.stderr)
    args.out.write_text(json.dumps(dump, indent=1, sort_keys=True) + "\n")
    if args.compare is None:
        return 0
    old = json.loads(args.compare.read_text())
    if args.theory_only:
        old["runs"] = {}
    found = differences(old, dump)
    for line in found[:50]:
        print(line)
    print(f"{len(found)} differences" if found else "identical")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
