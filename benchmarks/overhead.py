"""distlab's overhead: its training step against a hand-written step, family by family.

    python benchmarks/overhead.py                     # ddp fsdp zero2 tp pp, 2 ranks, small model
    python benchmarks/overhead.py --strategies tp --rounds 20 --block 3

On each of N ranks (gloo, CPU) three copies of the same GPT (same seed) train
on the same global batches, interleaved block by block so that machine noise
(other jobs, frequency changes) hits all of them alike:

- ``hand``: the family's hand-written step (``hand_steps.py``: DDP, fully_shard,
  a DeepSpeed engine, parallelize_module, PipelineStage + schedule) on a plain
  ``gloo`` process group, doing what distlab's step does for its figures: the
  loss averaged over the data-parallel ranks, clipping, the gradient norm;
- ``hand+count``: the same step on distlab's counting process group
  (``distlab.measure``), to show what counting the collectives costs;
- ``distlab``: ``registry.get(strategy).prepare(model, ctx, config)`` and its
  ``TrainStep.step`` on the counting group, as in ``python -m distlab.launch``.

Checked, not assumed: the last warm-up step's loss and gradient norm of each
variant are printed (the same to rounding), and so are the collectives each
variant issued on the counting group in that step (``hand``: none, so it
really ran on plain gloo; ``hand+count`` and ``distlab``: the same calls).

Every step is timed by the wall clock and by the CPU time of the rank's
process (all its threads, gloo's included): on a machine shared with other
jobs the wall clock also measures waiting for a core, the CPU time only the
work done. Each round runs ``--block`` steps of every variant (in a rotating
order) after a barrier; a step's wall time is the slowest rank's, its CPU
time the sum over ranks. Reported: the median step time of each variant, and
the ratios distlab / hand (target <= 1.03) and distlab / hand+count as the
median over rounds of the per-round ratio (paired, so slow phases of a shared
machine cancel), plus the ratio of the 20th-percentile step times (the least
disturbed steps). Writes the table to stdout and, with ``--out``, JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

VARIANTS = ("hand", "hand+count", "distlab")
FAMILIES = ("ddp", "fsdp", "zero2", "tp", "pp")


def collectives(stats) -> dict[str, int]:
    """Calls per collective type in one counted window (``CommStats``)."""
    return {kind: totals.calls for kind, totals in sorted(stats.kinds.items())}


def run_rank(rank: int, world: int, init_method: str, settings: dict, out: str) -> None:
    import torch
    import torch.distributed as dist
    from hand_steps import deepspeed_environment, hand_step

    from distlab.config import resolved_seq_len
    from distlab.data import global_batch, load_tokens, prepare_tokens, rank_slice
    from distlab.distributed import RankContext
    from distlab.measure.counter import counter
    from distlab.measure.process_group import register_backend
    from distlab.model import build_model
    from distlab.strategies import registry
    from distlab.strategies.resolve import load_config

    torch.set_num_threads(1)
    deepspeed_environment(rank, world)
    dist.init_process_group(
        register_backend(),
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    plain = dist.new_group(backend="gloo")
    ctx = RankContext(rank, world, torch.device("cpu"))
    tokens = load_tokens(prepare_tokens(None))
    results: dict[str, dict] = {}
    for strategy in settings["strategies"]:
        config = load_config(
            None,
            {
                "strategy": strategy,
                "nproc": world,
                "model": settings["model"],
                "global_batch": settings["global_batch"],
                "steps": 10**6,
                "quiet": True,
            },
        )
        seq = resolved_seq_len(config)
        step = registry.get(strategy).prepare(build_model(config.model, config.seed), ctx, config)
        microbatches = getattr(step, "microbatches", None)
        runners = {
            "distlab": lambda x, y, s=step: s.step(x, y),
            "hand": hand_step(strategy, config, plain, microbatches),
            "hand+count": hand_step(strategy, config, dist.group.WORLD, microbatches),
        }

        def batch(i, step=step, config=config, seq=seq):
            b = global_batch(tokens, config.seed, i, config.global_batch, seq)
            return rank_slice(b, step.dp_rank, step.dp_size)

        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
        counted: dict[str, dict[str, int]] = {}
        figures: dict[str, list[float]] = {}
        for i in range(settings["warmup"]):
            for variant in VARIANTS:
                dist.barrier(group=plain)
                counter().begin_step()
                result = runners[variant](*batch(i))
                counted[variant] = collectives(counter().end_step())
                figures[variant] = (
                    list(result)
                    if variant != "distlab"
                    else [
                        result.loss,
                        result.grad_norm,
                    ]
                )
        for r in range(settings["rounds"]):
            order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
            for variant in order:
                dist.barrier(group=plain)
                for k in range(settings["block"]):
                    x, y = batch(settings["warmup"] + r * settings["block"] + k)
                    tic, cpu_tic = time.perf_counter(), time.process_time()
                    runners[variant](x, y)
                    times[variant].append(time.perf_counter() - tic)
                    cpu[variant].append(time.process_time() - cpu_tic)
        gathered = [None] * world
        dist.all_gather_object(gathered, (times, cpu, counted), group=plain)
        n = len(times["hand"])
        # A step takes as long as its slowest rank; its work is the CPU time of all ranks.
        results[strategy] = {
            "wall": {v: [max(g[0][v][i] for g in gathered) for i in range(n)] for v in VARIANTS},
            "cpu": {v: [sum(g[1][v][i] for g in gathered) for i in range(n)] for v in VARIANTS},
            # Collectives each rank issued on the counting group in the last warm-up step.
            "counted_collectives": [g[2] for g in gathered],
            # (loss, grad norm) of the last warm-up step: both sides compute the same figures.
            "last_warmup_figures": figures,
        }
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier(group=plain)
    dist.destroy_process_group()


def paired_ratio(times: dict[str, list[float]], a: str, b: str, block: int) -> float:
    """Median over rounds of a's median step over b's median step in the same round."""
    ratios = []
    for start in range(0, len(times[a]), block):
        ratios.append(
            statistics.median(times[a][start : start + block])
            / statistics.median(times[b][start : start + block])
        )
    return statistics.median(ratios)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", nargs="+", default=list(FAMILIES))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--model", default="small")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--block", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from distlab.distributed import free_port
    from distlab.launch.spawn import rank_context

    settings = {
        "strategies": args.strategies,
        "model": args.model,
        "global_batch": args.global_batch,
        "rounds": args.rounds,
        "block": args.block,
        "warmup": args.warmup,
    }
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"distlab-overhead-{os.getpid()}.json"
    init_method = f"tcp://127.0.0.1:{free_port()}"
    # Ranks fork from distlab's rank server, which imports torch (and DeepSpeed for zero2)
    # once, not in every rank; started by this call unless this process already runs one.
    context = rank_context(args.strategies)
    procs = [
        context.Process(target=run_rank, args=(r, args.nproc, init_method, settings, str(out)))
        for r in range(args.nproc)
    ]
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):
        if any(p.exitcode for p in procs):  # a failed rank: the others would wait for it
            for p in procs:
                p.terminate()
        time.sleep(0.2)
    if any(p.exitcode for p in procs):
        sys.exit(f"a rank failed (exit codes {[p.exitcode for p in procs]})")
    results = json.loads(out.read_text())
    out.unlink()
    report: dict[str, dict] = {}
    print(
        f"{args.model} model, global batch {args.global_batch}, {args.nproc} ranks, "
        f"{args.rounds} rounds x {args.block} steps per variant (interleaved); step = slowest rank"
    )
    print(
        f"{'strategy':8s} {'clock':6s} {'hand ms':>9s} {'hand+count':>11s} {'distlab ms':>11s} "
        f"{'distlab/hand':>13s} {'(p20)':>7s} {'distlab/hand+count':>19s} {'count/hand':>11s}"
    )
    for strategy, measured in results.items():
        report[strategy] = {
            "counted_collectives": measured["counted_collectives"],
            "last_warmup_figures": measured["last_warmup_figures"],
        }
        for clock in ("wall", "cpu"):
            times = measured[clock]
            med = {v: statistics.median(times[v]) for v in VARIANTS}
            low = {v: sorted(times[v])[len(times[v]) // 5] for v in VARIANTS}
            row = {
                "median_step_s": med,
                "p20_step_s": low,
                "distlab_over_hand": paired_ratio(times, "distlab", "hand", args.block),
                "distlab_over_hand_p20": low["distlab"] / low["hand"],
                "distlab_over_hand_count": paired_ratio(times, "distlab", "hand+count", args.block),
                "count_over_hand": paired_ratio(times, "hand+count", "hand", args.block),
                "steps_per_variant": len(times["hand"]),
            }
            report[strategy][clock] = row
            print(
                f"{strategy:8s} {clock:6s} {med['hand'] * 1e3:9.1f} "
                f"{med['hand+count'] * 1e3:11.1f} "
                f"{med['distlab'] * 1e3:11.1f} {row['distlab_over_hand']:13.3f} "
                f"{row['distlab_over_hand_p20']:7.3f} {row['distlab_over_hand_count']:19.3f} "
                f"{row['count_over_hand']:11.3f}"
            )
    for strategy, measured in results.items():
        last = measured["last_warmup_figures"]
        figures = "  ".join(f"{v} {last[v][0]:.6f} / {last[v][1]:.6f}" for v in VARIANTS)
        print(f"{strategy}: loss / grad norm of the last warm-up step: {figures}")
        for r, counted in enumerate(measured["counted_collectives"]):
            calls = "; ".join(f"{v} {counted[v] or 'none'}" for v in VARIANTS)
            print(f"{strategy}: rank {r} collectives on the counting group per step: {calls}")
    print(
        "wall: step time of the slowest rank; cpu: CPU seconds of all ranks' processes per step "
        "(insensitive to waiting for a core on a shared machine).\n"
        "ratios: median over rounds of (a's median / b's median) in the same round; "
        "p20: ratio of the 20th-percentile steps"
    )
    if args.out:
        args.out.write_text(json.dumps({"settings": settings, "results": report}, indent=2) + "\n")


if __name__ == "__main__":
    main()
