"""Memory does not grow with the corpus: 200 MB against 2 GB of text.

    python benchmarks/corpus_memory.py                    # 200 MB and 2 GB, 5 steps each
    python benchmarks/corpus_memory.py --sizes-mb 100,1000 --workdir /tmp/corpora

Writes each corpus (files of 10 MB of random words, deterministic from the seed) unless
the work dir has it, then tokenises it (with a distlab cache of its own, so it is
tokenised here) and trains the tiny model for a few steps on it (``single``,
``--launcher local``), while this script samples, every 0.1 s from
``/proc/PID/status`` (the kernel's figures, independent of distlab's own memory
tracking, which counts tensors), of the launcher (which tokenises) and of rank 0:

- ``RssAnon``: private memory, what a process holds itself;
- rank 0's ``VmHWM``: its peak resident memory, file pages of the memory-mapped token
  file included (they are the page cache's, shared and evictable).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from distlab.run.files import read_pid

FILE_MB = 10
WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an which "
    "have not but all were when we there can their one has more if will each about how "
    "gradient shard rank batch tensor pipeline stage replica optimizer memory"
).split()


def write_corpus(folder: Path, megabytes: int, seed: int = 0) -> Path:
    """``megabytes`` of random words in files of ``FILE_MB`` MB (kept if already there)."""
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocabulary = np.array([w + " " for w in WORDS])
    for index in range(megabytes // FILE_MB):
        words = rng.choice(vocabulary, size=FILE_MB * 2**20 // 5)  # ~5 bytes a word
        (folder / f"part{index:05d}.txt").write_text("".join(words))
    done.touch()
    return folder


def status_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` field in KiB (0 if the process or the field is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(x for x in status.splitlines() if x.startswith(field + ":")).split()[1])
    except (OSError, ValueError, StopIteration):
        return 0


def sample_peaks(run_dir: Path, process: subprocess.Popen, peaks: dict[str, int]) -> None:
    """Until the run ends: the largest launcher RssAnon, rank 0 RssAnon and rank 0 VmHWM."""
    while process.poll() is None:
        rank = read_pid(run_dir, 0)
        figures = {"launcher private": status_kib(process.pid, "RssAnon")}
        if rank is not None:
            figures["rank 0 private"] = status_kib(rank, "RssAnon")
            figures["rank 0 peak"] = status_kib(rank, "VmHWM")
        for name, kib in figures.items():
            peaks[name] = max(peaks.get(name, 0), kib * 1024)
        time.sleep(0.1)


def train(corpus: Path, run_dir: Path, steps: int, cache: Path) -> tuple[dict[str, int], float]:
    """Tokenise ``corpus`` into ``cache`` and train on it; the peaks (bytes) and wall time."""
    command = [
        sys.executable, "-m", "distlab.launch", "--launcher", "local", "--strategy", "single",
        "--model", "tiny", "--steps", str(steps), "--data", str(corpus), "--no-wandb",
        "--quiet", "--no-pictures", "--no-final-checkpoint", "--track-memory", "off",
        "--run-dir", str(run_dir),
    ]  # fmt: skip
    shutil.rmtree(run_dir, ignore_errors=True)  # a run measured again starts afresh
    shutil.rmtree(cache, ignore_errors=True)  # and tokenises again
    started = time.time()
    process = subprocess.Popen(command, env={**os.environ, "DISTLAB_CACHE": str(cache)})
    peaks: dict[str, int] = {}
    watcher = threading.Thread(target=sample_peaks, args=(run_dir, process, peaks))
    watcher.start()
    if process.wait() != 0:
        raise SystemExit(f"training on {corpus} failed")
    watcher.join()
    return peaks, time.time() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="200,2000", help="comma-separated corpus sizes")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workdir", help="keep the corpora here (default: a temporary dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="distlab-corpora-") as tmp:
        root = Path(args.workdir or tmp)
        columns = ["launcher private", "rank 0 private", "rank 0 peak"]
        print("| corpus | text | " + " | ".join(columns) + " | wall time |")
        print("|---:|---:|" + "---:|" * len(columns) + "---:|")
        for megabytes in map(int, args.sizes_mb.split(",")):
            corpus = write_corpus(root / f"corpus-{megabytes}mb", megabytes)
            peaks, wall = train(
                corpus, root / f"run-{megabytes}mb", args.steps, root / f"cache-{megabytes}mb"
            )
            text = sum(p.stat().st_size for p in corpus.glob("*.txt"))
            cells = " | ".join(f"{peaks.get(c, 0) / 2**20:,.0f} MiB" for c in columns)
            print(
                f"| {megabytes:,} MB | {text / 2**20:,.0f} MiB | {cells} | {wall:.0f} s |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
