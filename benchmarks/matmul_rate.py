"""Achieved matrix-multiply rate by shape and precision: how efficiency depends on size.

    python benchmarks/matmul_rate.py --out matmul_rate.json       # on a GPU (or a CPU)
    python benchmarks/matmul_rate.py --render matmul_rate.json    # fill docs/performance.md

A transformer's step is mostly (tokens x d) @ (d x n) products; how close one
runs to the chip's peak depends on its sizes (small ones cannot fill the chip,
and launch overhead dominates them). This times ``torch.matmul`` for the
products of GPT-shaped layers, d = 128 ... 8192 at 2,048 ... 16,384 tokens
(the QKV/output d x d, the MLP's d x 4d and 4d x d), in each ``--dtypes``,
and prints TFLOP/s per shape: the efficiency curve a step-time model needs.
``--render`` writes the ``matmul-rate`` section of ``docs/performance.md`` from
such a JSON (measured on the GPU machine, rendered here).
On a GPU the time is CUDA events around ``--repeat`` products after warm-up
(TF32 off, so fp32 is fp32); on a CPU ``time.perf_counter`` with the threads
torch has.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from distlab.report.markdown import fill_marked_section

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = [128, 256, 512, 768, 1024, 2048, 4096, 8192]
TOKENS = [2048, 16384]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def shapes(hidden: list[int], tokens: list[int]) -> list[tuple[int, int, int]]:
    """(m, k, n) of a block's matmuls: m tokens, d x d and d x 4d and 4d x d weights."""
    return [(t, k, n) for d in hidden for t in tokens for k, n in ((d, d), (d, 4 * d), (4 * d, d))]


def seconds_per_matmul(a: torch.Tensor, b: torch.Tensor, repeat: int) -> float:
    """Median seconds of one ``a @ b`` over three timed runs of ``repeat`` products."""
    for _ in range(3):
        a @ b
    runs = []
    for _ in range(3):
        if a.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeat):
                a @ b
            end.record()
            torch.cuda.synchronize()
            runs.append(start.elapsed_time(end) / 1e3 / repeat)
        else:
            started = time.perf_counter()
            for _ in range(repeat):
                a @ b
            runs.append((time.perf_counter() - started) / repeat)
    return statistics.median(runs)


def render(data: dict) -> str:
    """The ``matmul-rate`` section: TFLOP/s by hidden size (rows) and shape (columns)."""
    rows = data["rows"]
    columns = sorted({(r["dtype"], r["m"], r["k"] < r["n"], r["k"] > r["n"]) for r in rows})
    names = {(False, False): "d x d", (True, False): "d x 4d", (False, True): "4d x d"}
    lines = [
        f"Measured by `python benchmarks/matmul_rate.py` on {data['device']} (torch "
        f"{data['torch']}, {data['date']}); TFLOP/s of one (tokens x k) @ (k x n) product.",
        "",
        "| d | " + " | ".join(f"{c[0]} {c[1]} tok, {names[c[2:]]}" for c in columns) + " |",
        "|---:|" + "---:|" * len(columns),
    ]
    for d in sorted({min(r["k"], r["n"]) for r in rows}):
        cells = []
        for dtype, m, wide, tall in columns:
            k, n = (d, 4 * d) if wide else (4 * d, d) if tall else (d, d)
            match = [r for r in rows if (r["dtype"], r["m"], r["k"], r["n"]) == (dtype, m, k, n)]
            cells.append(f"{match[0]['tflops']:,.0f}" if match else "")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the rates here (JSON)")
    parser.add_argument("--render", type=Path, help="fill docs/performance.md from this JSON")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--hidden", nargs="+", type=int, help="default: 128 ... 8192 on a GPU")
    parser.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    if args.render:
        fill_marked_section(args.doc, "matmul-rate", render(json.loads(args.render.read_text())))
        print(f"wrote {args.doc}")
        return 0
    cuda = torch.cuda.is_available()
    torch.backends.cuda.matmul.allow_tf32 = False
    device = "cuda" if cuda else "cpu"
    hidden = args.hidden or (HIDDEN if cuda else HIDDEN[:4])
    rows = []
    for dtype_name in args.dtypes:
        for m, k, n in shapes(hidden, args.tokens):
            a = torch.randn(m, k, device=device, dtype=DTYPES[dtype_name])
            b = torch.randn(k, n, device=device, dtype=DTYPES[dtype_name])
            seconds = seconds_per_matmul(a, b, args.repeat if cuda else 2)
            tflops = 2 * m * k * n / seconds / 1e12
            rows.append({"dtype": dtype_name, "m": m, "k": k, "n": n, "tflops": round(tflops, 2)})
            print(f"{dtype_name} {m:>6} x {k:>5} x {n:>5}: {tflops:8.2f} TFLOP/s", flush=True)
    threads = torch.get_num_threads()
    data = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({threads} threads)",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
