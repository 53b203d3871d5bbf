"""``--ac``: activation memory saved and recomputation paid, on one CPU process.

    python benchmarks/activation_checkpoint.py                       # small model, batch 16
    python benchmarks/activation_checkpoint.py --model tiny --batch 8 --rounds 3

Builds the model once per mode (none, full, selective; same seed), as the
``single`` strategy prepares it (``apply_ac``), and on the same batch of random
tokens measures:

- peak memory of one forward and backward (loss and gradients included), by
  category, with torch's ``MemTracker`` (``distlab.measure.activation_memory``):
  activations, and the total at the peak;
- the time of one forward and backward (no optimizer step, which checkpointing
  does not change), in rounds that interleave the modes (rotating the order each
  round) so that a slow phase of a shared machine falls on all of them; reported
  as the median over rounds and relative to ``none``.

One thread, as one rank of a run uses. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from distlab.config import AC_MODES  # noqa: E402
from distlab.measure.activation_memory import ACTIVATIONS, peak_bytes  # noqa: E402
from distlab.model import PRESETS, build_model  # noqa: E402
from distlab.strategies.activation_checkpoint import apply_ac  # noqa: E402
from distlab.strategies.base import language_model_loss  # noqa: E402

MIB = 2**20


def main() -> None:
    """Measure every ``--ac`` mode and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=16, help="sequences per forward")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per mode")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seq_len = PRESETS[args.model].block_size
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (args.batch, seq_len + 1), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    models = {}
    for mode in AC_MODES:
        models[mode] = build_model(args.model, seed=0)
        apply_ac(models[mode], mode)

    def step(mode: str) -> None:
        model = models[mode]
        language_model_loss(model(inputs), targets).backward()
        for parameter in model.parameters():
            parameter.grad = None

    peaks = {mode: peak_bytes(models[mode], lambda mode=mode: step(mode)) for mode in AC_MODES}
    times: dict[str, list[float]] = {mode: [] for mode in AC_MODES}
    for round_index in range(args.rounds):
        shift = round_index % len(AC_MODES)
        for mode in AC_MODES[shift:] + AC_MODES[:shift]:
            start = time.perf_counter()
            step(mode)
            times[mode].append(time.perf_counter() - start)

    print(f"model {args.model}, batch {args.batch} x {seq_len} tokens, 1 thread, "
          f"{args.rounds} rounds")  # fmt: skip
    print()
    print("| --ac | peak activations (MiB) | peak total (MiB) | fwd+bwd (ms) | time vs none |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(times["none"])
    for mode in AC_MODES:
        median = statistics.median(times[mode])
        print(
            f"| {mode} | {peaks[mode][ACTIVATIONS] / MIB:.1f} | {peaks[mode]['Total'] / MIB:.1f} "
            f"| {median * 1e3:.0f} | {median / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
