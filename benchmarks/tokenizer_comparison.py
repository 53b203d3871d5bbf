"""Raw bytes against a byte-level BPE on the default corpus: loss, bits per byte, speed.

    python benchmarks/tokenizer_comparison.py                       # bytes vs bpe:4096, 100 steps
    python benchmarks/tokenizer_comparison.py --tokenizers bytes,bpe:1024,bpe:4096 --steps 60

One ``single`` run of the ``small`` model per tokenizer, one after another, with the
same seed, global batch (16 sequences of 128 tokens) and ``--eval-every 10`` on the
held-out documents (the same documents for every tokenizer: the split is by text).
The runs differ in what a token is: a BPE token holds several bytes, so a sequence
covers more text, and its embedding and head grow with the vocabulary.

Writes into docs/tokenizers.md (between the ``tokenizers`` markers) a table per
evaluated step of the training and validation loss in nats per token and the
validation bits per byte, and each run's tokens/s and bytes/s; and
docs/tokenizers_bpb.png, validation bits per byte over the steps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from distlab.cli import run_cli
from distlab.data import token_facts
from distlab.launch.__main__ import main as launch_main
from distlab.report.markdown import fill_marked_section
from distlab.run.files import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "tokenizers.md"
PICTURE = ROOT / "docs" / "tokenizers_bpb.png"


def train(tokenizer: str, steps: int, run_dir: Path) -> Path:
    """One single-process run of the small model with ``tokenizer``; its run dir."""
    code = launch_main(
        [
            "--launcher",
            "local",
            "--strategy",
            "single",
            "--model",
            "small",
            "--steps",
            str(steps),
            "--tokenizer",
            tokenizer,
            "--eval-every",
            "10",
            "--track-memory",
            "off",
            "--no-wandb",
            "--quiet",
            "--no-pictures",
            "--no-final-checkpoint",
            "--run-dir",
            str(run_dir),
        ]  # fmt: skip
    )
    if code != 0:
        raise SystemExit(f"the {tokenizer} run failed (exit {code})")
    return run_dir


def training_facts(run_dir: Path) -> dict:
    """``token_facts`` of the run's training split (bytes per token of what it trained on)."""
    import yaml

    from distlab.config_reading import build_config
    from distlab.data import prepare_tokens

    config = build_config(yaml.safe_load((run_dir / CONFIG_FILE).read_text()))
    return token_facts(prepare_tokens(config.data, True, config.tokenizer))


def report(runs: dict[str, Path]) -> str:
    """The Markdown section: the losses per evaluated step and the speed of each run."""
    metrics = {name: read_jsonl(run / METRICS_FILE) for name, run in runs.items()}
    evaluated = [m["step"] for m in next(iter(metrics.values())) if "val_loss" in m]
    head = " | ".join(
        f"{name} train loss | {name} val loss | {name} val bits/byte" for name in runs
    )
    lines = [f"| step | {head} |", "|---:" + "|---:" * 3 * len(runs) + "|"]
    for step in evaluated:
        cells = []
        for name in runs:
            line = next(m for m in metrics[name] if m["step"] == step)
            cells += [f"{line['loss']:.3f}", f"{line['val_loss']:.3f}", f"{line['val_bpb']:.3f}"]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines += ["", "| run | vocabulary | bytes per token (training split) | tokens/s | bytes/s |"]
    lines.append("|---|---:|---:|---:|---:|")
    for name, run in runs.items():
        summary = json.loads((run / SUMMARY_FILE).read_text())
        facts = training_facts(run)
        per_token = facts["bytes"] / facts["tokens"]
        lines.append(
            f"| {name} | {facts['vocab_size']} | {per_token:.2f} | "
            f"{summary['tokens_per_s']:,.0f} | {summary['tokens_per_s'] * per_token:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def draw(runs: dict[str, Path], output: Path) -> None:
    """Validation bits per byte over the steps, one line per tokenizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    for name, run in runs.items():
        points = [
            (m["step"], m["val_bpb"]) for m in read_jsonl(run / METRICS_FILE) if "val_bpb" in m
        ]
        axis.plot(*zip(*points, strict=True), marker="o", label=name)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("validation bits per byte")
    axis.set_title("held-out bits per byte: raw bytes against BPE (small model, single)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizers", default="bytes,bpe:4096", help="comma-separated")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--no-docs", action="store_true", help="print, do not touch the docs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="distlab-tokenizers-") as tmp:
        runs = {
            name: train(name, args.steps, Path(tmp) / name.replace(":", ""))
            for name in args.tokenizers.split(",")
        }
        section = report(runs)
        print(section)
        if not args.no_docs:
            fill_marked_section(DOCS, "tokenizers", section)
            draw(runs, PICTURE)
    return 0


if __name__ == "__main__":
    run_cli(main)
