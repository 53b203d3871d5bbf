"""``--ac``: activation memory saved and recomputation paid, on one CPU process.

    python benchmarks/activation_checkpoint.py                       # small model, batch 16
    python benchmarks/activation_checkpoint.py --model tiny --batch 8 --rounds 3

Builds the model once per mode (none, full, selective; same seed), as the
``single`` strategy prepares it (``apply_ac``), and on the same batch of random
tokens measures:

- peak memory of one forward and backward (loss and gradients included), by
  category, with torch's ``MemTracker`` (``distlab.measure.step_memory``):
  activations, and the total at the peak; beside them the theory's
  activations at the moment nearest the measured peak (``distlab.theory.memory``,
  the config of a ``single`` run of this batch with SGD, which keeps no state);
- the FLOP model of the recomputation: ``full`` runs the blocks' forward once
  more, so fwd+bwd costs (3 F + F_blocks) / 3 F of ``none`` (F a forward's
  FLOPs, ``distlab.model.flops_per_token`` / 3); ``selective`` recomputes only
  element-wise ops (norms, GELU, adds), about no FLOPs;
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

from distlab.config_checks import AC_MODES  # noqa: E402
from distlab.measure.step_memory import HeldTensors, StepMemory  # noqa: E402
from distlab.measure.step_tracker import StepMemoryTracker  # noqa: E402
from distlab.model import PRESETS, build_model, flops_per_token  # noqa: E402
from distlab.strategies.activation_checkpoint import apply_ac  # noqa: E402
from distlab.strategies.resolve import load_config  # noqa: E402
from distlab.strategies.step_parts import language_model_loss  # noqa: E402
from distlab.theory.memory import nearest_moment, predict_peak  # noqa: E402

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

    peaks = {mode: measure_peak(models[mode], lambda mode=mode: step(mode)) for mode in AC_MODES}
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
    print(
        "| --ac | peak activations (MiB) | predicted (MiB) | peak total (MiB) | fwd+bwd (ms) "
        "| time vs none | FLOP model |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = statistics.median(times["none"])
    for mode in AC_MODES:
        median = statistics.median(times[mode])
        measured = peaks[mode].peak_by_category
        config = load_config(
            None,
            {"strategy": "single", "model": args.model, "global_batch": args.batch,
             "optimizer": "sgd", "ac": mode},
        )  # fmt: skip
        moment = nearest_moment(predict_peak(config).to_dict(), measured)
        print(
            f"| {mode} | {measured['activations'] / MIB:.1f} "
            f"| {moment['by_category']['activations'] / MIB:.1f} | {peaks[mode].peak / MIB:.1f} "
            f"| {median * 1e3:.0f} | {median / base:.2f}x "
            f"| {recompute_factor(args.model, mode):.2f}x |"
        )


def measure_peak(model: torch.nn.Module, step) -> StepMemory:
    """One forward and backward of ``model`` inside torch's tracker (``step_memory``)."""
    tracker = StepMemoryTracker(HeldTensors(modules=[model]), torch.device("cpu"))
    with tracker:
        step()
    return tracker.result()


def recompute_factor(model: str, mode: str) -> float:
    """fwd+bwd FLOPs with ``mode`` over those without: full recomputes the blocks' forward."""
    if mode != "full":
        return 1.0
    shape = PRESETS[model]
    forward = flops_per_token(shape, shape.block_size) / 3
    head = 2 * shape.d_model * shape.vocab_size  # the LM head's matmul, not recomputed
    return (3 * forward + forward - head) / (3 * forward)


if __name__ == "__main__":
    main()
