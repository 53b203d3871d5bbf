"""``distlab export RUN_DIR OUT`` (= ``python -m distlab.export``): a run as a Hugging Face GPT-2.

Loads the newest committed checkpoint of a run of any strategy and world size
into one process (``distlab.hf.run_weights``) and writes OUT so that
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads it as a
``GPT2LMHeadModel`` with the same logits, and ``AutoTokenizer.from_pretrained(OUT)``
as the run's tokenizer: the byte tokenizer, or the BPE or file it trained with
(``distlab.hf.directory``; docs/hugging_face.md).
"""

from __future__ import annotations

from pathlib import Path

from distlab.checkpoint.layout import describe_checkpoint
from distlab.cli import OneLineErrorParser, run_cli
from distlab.errors import DistlabError
from distlab.hf.directory import describe, write_directory
from distlab.hf.gpt2 import check_convertible
from distlab.hf.run_weights import load_run_model
from distlab.hf.tokenizer import run_tokenizer_file


def build_parser() -> OneLineErrorParser:
    """The export command's arguments."""
    parser = OneLineErrorParser(
        prog="distlab export",
        description="Write a run's newest checkpoint as a Hugging Face GPT-2 directory.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run to export")
    parser.add_argument("out", metavar="OUT", help="a new (or empty) directory to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Export RUN_DIR's newest checkpoint to OUT; print what was written."""
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DistlabError(f"{out} already exists and is not an empty directory; choose a new OUT")
    model, checkpoint = load_run_model(Path(args.run_dir))  # one-line errors for a bad run
    check_convertible(model.config)
    run_dir = Path(args.run_dir)
    files = write_directory(out, model.config, model.state_dict(), run_tokenizer_file(run_dir))
    print(f"exported {describe_checkpoint(checkpoint)} ({describe(model.config)}) to {out}:")
    print("  " + ", ".join(file.name for file in files))
    return 0


if __name__ == "__main__":
    run_cli(main)
