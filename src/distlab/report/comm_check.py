"""``python -m distlab.comm_check``: counted communication vs theory vs the kernel's TCP bytes.

    python -m distlab.comm_check                       # ddp, fsdp, tp, pp on 2 ranks, tiny model
    python -m distlab.comm_check ddp fsdp zero3 --nproc 4 --model small
    python -m distlab.comm_check fsdp+tp:tp=2 ddp+pp:pp=2 --nproc 4

Starts N local ranks on the counting gloo backend (``distlab.measure``), trains
each strategy for a few steps and, over the steady-state steps (the first is
left out: DDP rebuilds its buckets, FSDP and pipelines initialise lazily),
compares three independent numbers per rank and step:

- counted: the payload and estimated wire bytes of every collective the
  process group saw (``CommCounter``);
- predicted: ``distlab.theory.comm.predict_comm`` for the config (rank 0);
- on the wire: bytes the kernel acknowledged on the rank's loopback TCP sockets
  (``ss -tin``'s ``bytes_acked``), the rendezvous store's connections excluded.

counted/predicted checks the theory; tcp/wire checks the counter and the
gloo algorithm model (ring all-reduce 2 (N-1)/N of the buffer per rank, ...).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from distlab.cli import OneLineErrorParser, run_cli
from distlab.config import model_shape, resolved_seq_len
from distlab.data import global_batch, load_tokens, prepare_tokens, rank_slice
from distlab.distributed import RankContext, free_port
from distlab.launch.spawn import rank_context
from distlab.measure.counter import counter
from distlab.measure.process_group import register_backend
from distlab.measure.tcp import tcp_bytes
from distlab.model import build_model
from distlab.strategies import registry
from distlab.strategies.base import StepResult
from distlab.strategies.resolve import load_config
from distlab.theory.collectives import ExpertRouting
from distlab.theory.comm import predict_comm

SETTLE_S = 0.2
"""Pause before reading TCP counters, so the last segments are acknowledged."""


def _rank(
    rank: int,
    world: int,
    port: int,
    cells: list[dict[str, Any]],
    steps: list[int],
    warmup: list[int],
    tcp: bool,
    queue: Any,
    environment: dict[str, str],
) -> None:
    import torch
    import torch.distributed as dist

    os.environ.clear()  # the launcher's, not the rank server's (``distlab.launch.spawn``)
    os.environ.update(environment)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            register_backend(),
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=120),
        )
        side = dist.new_group(backend="gloo")  # for synchronising the measurement windows
        ctx = RankContext(rank, world, torch.device("cpu"))
        tokens = load_tokens(prepare_tokens(None))
        tally = counter()
        results = []
        for cell, cell_steps, cell_warmup in zip(cells, steps, warmup, strict=True):
            if "collective" in cell:
                results.append(_collective(cell, side, port, tally, tcp))
                continue
            config = load_config(None, {**cell, "nproc": world, "steps": cell_steps})
            seq = resolved_seq_len(config)
            model = build_model(model_shape(config), config.seed)
            train_step = registry.get(config.strategy).prepare(model, ctx, config)

            def run(step: int, train_step=train_step, config=config, seq=seq) -> StepResult:
                batch = global_batch(tokens, config.seed, step, config.global_batch, seq)
                inputs, targets = rank_slice(batch, train_step.dp_rank, train_step.dp_size)
                return train_step.step(inputs, targets)

            losses = [run(step).loss for step in range(cell_warmup)]
            window = _measured_window(
                lambda run=run, measured=range(cell_warmup, cell_steps): [run(s) for s in measured],
                side,
                port,
                tally,
                tcp,
            )
            measured = window.pop("result")
            losses += [result.loss for result in measured]
            routing = {  # expert parallelism's rows per rank, summed over the window
                key: [sum(n) for n in zip(*(r.routing[key] for r in measured), strict=True)]
                for key in ("ep/rows_sent", "ep/rows_received")
                if key in measured[0].routing
            }
            results.append(
                {
                    "cell": cell,
                    "steps": cell_steps - cell_warmup,
                    **window,
                    "losses": losses,
                    "routing": routing,
                }
            )
            del train_step, model
        queue.put((rank, results))
        dist.barrier(group=side)
        dist.destroy_process_group()
    except BaseException as exc:
        queue.put((rank, f"{type(exc).__name__}: {exc}"))
        raise


def _collective(
    cell: dict[str, Any], side: Any, port: int, counter: Any, tcp: bool
) -> dict[str, Any]:
    """One raw collective of ``cell["numel"]`` fp32 elements, counted and measured."""
    import torch
    import torch.distributed as dist

    kind, numel = cell["collective"], int(cell["numel"])
    rank, world = dist.get_rank(), dist.get_world_size()
    tensor = torch.ones(numel)
    if kind == "all_reduce":
        run = lambda: dist.all_reduce(tensor)  # noqa: E731
    elif kind == "all_gather":
        out = torch.empty(numel * world)
        run = lambda: dist.all_gather_into_tensor(out, tensor)  # noqa: E731
    elif kind == "reduce_scatter":
        out = torch.empty(numel // world)
        run = lambda: dist.reduce_scatter_tensor(out, tensor)  # noqa: E731
    elif kind == "broadcast":
        run = lambda: dist.broadcast(tensor, src=0)  # noqa: E731
    elif kind == "send":  # rank r sends to r + 1, receives from r - 1 (a ring of messages)
        inbox = torch.empty(numel)

        def run() -> None:
            send = dist.isend(tensor, (rank + 1) % world)
            dist.recv(inbox, (rank - 1) % world)
            send.wait()
    else:
        raise ValueError(f"unknown collective {kind}")
    run()  # warm-up: connections, buffers
    window = _measured_window(run, side, port, counter, tcp)
    del window["result"]
    return {"cell": cell, "steps": 1, **window, "losses": []}


def _measured_window(work, side, port: int, counter, tcp: bool) -> dict[str, Any]:
    """Run ``work()`` between reads of the counter and, if ``tcp``, synchronised, settled
    reads of the TCP bytes (else ``tcp_sent``/``tcp_received`` are None)."""
    import torch.distributed as dist

    if not tcp:  # the counter counts this process's collectives alone: no need to wait
        counter.begin_step()
        result = work()
        stats = counter.end_step()
        return {"result": result, "comm": stats.to_dict(), "tcp_sent": None, "tcp_received": None}
    dist.barrier(group=side)
    time.sleep(SETTLE_S)
    before = tcp_bytes(os.getpid(), exclude_ports=[port])
    counter.begin_step()
    result = work()
    stats = counter.end_step()
    dist.barrier(group=side)
    time.sleep(SETTLE_S)
    after = tcp_bytes(os.getpid(), exclude_ports=[port])
    dist.barrier(group=side)
    tcp = after - before
    return {
        "result": result,
        "comm": stats.to_dict(),
        "tcp_sent": tcp.sent,
        "tcp_received": tcp.received,
    }


def _per_cell(value: int | Sequence[int], cells: int) -> list[int]:
    """``value`` for each of ``cells`` cells: one number for all, or already one per cell."""
    return [value] * cells if isinstance(value, int) else list(value)


def check(
    cells: list[dict[str, Any]],
    nproc: int = 2,
    steps: int | Sequence[int] = 3,
    timeout: float = 600,
    warmup: int | Sequence[int] = 1,
    tcp: bool = True,
) -> list[list[dict[str, Any]]]:
    """Run every cell (config overrides incl. ``strategy``) on ``nproc`` ranks, in one job.

    A cell ``{"collective": KIND, "numel": E}`` runs one raw collective instead
    (all_reduce, all_gather, reduce_scatter, broadcast, send) of E fp32 elements.

    Each cell trains ``steps`` steps, of which the first ``warmup`` are not measured
    (one-time work: DDP's bucket rebuild, lazy initialisation, DeepSpeed's module
    trace); either is one number for every cell or a list with one per cell.
    ``tcp=False`` skips the kernel's TCP counters and the pauses that let them settle
    (``tcp_sent``/``tcp_received`` are then None): for callers that read the counter alone.

    Returns, per rank, the list of per-cell results: counted ``comm`` totals over
    the ``steps - warmup`` measured steps, ``tcp_sent``/``tcp_received`` bytes in the
    same window, and the losses.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = rank_context(cell.get("strategy", "") for cell in cells)
    queue = context.Queue()
    port = free_port()
    environment = dict(os.environ)
    per_cell = (_per_cell(steps, len(cells)), _per_cell(warmup, len(cells)))
    procs = [
        context.Process(
            target=_rank, args=(r, nproc, port, cells, *per_cell, tcp, queue, environment)
        )
        for r in range(nproc)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < nproc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"comm check did not finish in {timeout:.0f} s")
            try:
                rank, value = queue.get(timeout=min(5.0, remaining))
            except Exception:  # noqa: BLE001 - queue.Empty: check the ranks are alive
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a rank died (exit codes {dead})") from None
                continue
            if isinstance(value, str):
                raise RuntimeError(f"rank {rank} failed: {value}")
            results[rank] = value
        for proc in procs:
            proc.join(timeout=60)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
    return [results[r] for r in range(nproc)]


def expert_routing(result: dict[str, Any], steps: int) -> ExpertRouting | None:
    """Rank 0's mean rows per step sent to / received from each ep rank, if it ran ``ep``."""
    routing = result.get("routing") or {}
    if "ep/rows_sent" not in routing:
        return None
    sent, received = routing["ep/rows_sent"], routing["ep/rows_received"]
    return ExpertRouting([n / steps for n in sent], [n / steps for n in received])


def summarize(
    cells: list[dict[str, Any]], results: list[list[dict[str, Any]]], nproc: int
) -> list[dict[str, Any]]:
    """Per cell: counted vs predicted (rank 0) and TCP vs counted wire bytes (every rank).

    Bytes and calls are per measured step; ``predicted_calls`` holds only the
    types whose number of calls the theory knows.
    """
    rows = []
    for index, cell in enumerate(cells):
        rank0 = results[0][index]
        steps = rank0["steps"]
        if "collective" in cell:
            predicted = None
        else:
            predicted = predict_comm(
                load_config(None, {**cell, "nproc": nproc}), expert_routing(rank0, steps)
            )
        counted = rank0["comm"]["bytes"] / steps
        per_rank = []
        for rank_results in results:
            r = rank_results[index]
            wire = r["comm"]["wire_bytes"] / steps
            tcp = r["tcp_sent"] / steps if r["tcp_sent"] is not None else None
            over = tcp / wire if wire and tcp is not None else None
            per_rank.append({"wire": wire, "tcp": tcp, "tcp_over_wire": over})
        rows.append(
            {
                "cell": cell,
                "counted_bytes": counted,
                "predicted_bytes": predicted.bytes if predicted else None,
                "counted_over_predicted": counted / predicted.bytes if predicted else None,
                "kinds": {k: v["bytes"] / steps for k, v in rank0["comm"]["kinds"].items()},
                "predicted_kinds": dict(predicted.kinds) if predicted else {},
                "calls": {k: v["calls"] / steps for k, v in rank0["comm"]["kinds"].items()},
                "predicted_calls": predicted.to_dict()["calls"] if predicted else {},
                "predicted_wire": predicted.wire_bytes if predicted else None,
                "ranks": per_rank,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(
        prog="python -m distlab.comm_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("strategies", nargs="*", default=["ddp", "fsdp", "tp", "pp"])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument(
        "--steps", type=int, default=3, help="steps per strategy (first not measured)"
    )
    args = parser.parse_args(argv)
    cells = []
    for spec in args.strategies:  # "fsdp+tp:tp=2" sets extra config fields
        name, _, extra = spec.partition(":")
        cell = {"strategy": name, "model": args.model, "global_batch": args.global_batch}
        cell.update(dict(item.split("=", 1) for item in extra.split(",") if item))
        cells.append(cell)
    results = check(cells, args.nproc, args.steps)
    print(
        f"{'strategy':12s} {'counted B/step':>15s} {'predicted':>12s} {'ratio':>7s}   "
        "per rank: tcp sent / counted wire bytes per step (ratio)"
    )
    printed: list[str] = []
    for row in summarize(cells, results, args.nproc):
        ratio = row["counted_over_predicted"]
        label = args.strategies[len(printed)]
        printed.append(label)
        ranks = "  ".join(
            f"r{i}: {r['tcp']:,.0f}/{r['wire']:,.0f} ({r['tcp_over_wire']:.3f})"
            if r["tcp_over_wire"]
            else f"r{i}: {r['tcp']:,.0f}/0"
            for i, r in enumerate(row["ranks"])
        )
        print(
            f"{label:12s} {row['counted_bytes']:15,.0f} "
            f"{row['predicted_bytes'] or 0:12,.0f} {ratio or 0:7.4f}   {ranks}"
        )
    return 0


if __name__ == "__main__":
    run_cli(main)
