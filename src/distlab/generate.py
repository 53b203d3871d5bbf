"""``distlab generate RUN_DIR --prompt TEXT --tokens N`` (= ``python -m distlab.generate``).

Loads the newest committed checkpoint of a run as ``distlab export`` does and
prints the prompt followed by N sampled bytes (``distlab.generation``: a KV
cache; greedy with ``--temperature 0``; the same ``--seed`` gives the same text).
Bytes that are not valid UTF-8 print as U+FFFD.
"""

from __future__ import annotations

import math
from pathlib import Path

from distlab.cli import OneLineErrorParser, run_cli
from distlab.errors import DistlabError
from distlab.generation import Sampling, generate
from distlab.hf.run_weights import load_run_model
from distlab.hf.tokenizer import run_codec


def build_parser() -> OneLineErrorParser:
    """The generate command's arguments."""
    parser = OneLineErrorParser(
        prog="distlab generate",
        description="Sample text from a run's newest checkpoint.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run whose model writes")
    parser.add_argument("--prompt", required=True, help="the text to continue (not empty)")
    parser.add_argument(
        "--tokens",
        type=int,
        default=100,
        help="tokens to generate (bytes under the byte tokenizer; default: 100)",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="softmax temperature; 0: always the most likely byte (default: 1.0)",
    )
    parser.add_argument(
        "--top-k", type=int, default=None, help="draw among the K most likely bytes only"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the draws (default: 0)")
    return parser


def check_arguments(prompt: str, tokens: int, sampling: Sampling) -> None:
    """One-line errors for values no generation can use."""
    if not prompt:
        raise DistlabError("--prompt must not be empty (the model needs a first byte)")
    if tokens < 1:
        raise DistlabError(f"--tokens must be >= 1 (got {tokens})")
    if not (sampling.temperature >= 0 and math.isfinite(sampling.temperature)):
        raise DistlabError(f"--temperature must be >= 0 (got {sampling.temperature}); 0 is greedy")
    if sampling.top_k is not None and sampling.top_k < 1:
        raise DistlabError(f"--top-k must be >= 1 (got {sampling.top_k})")


def main(argv: list[str] | None = None) -> int:
    """Print the prompt and its sampled continuation."""
    args = build_parser().parse_args(argv)
    sampling = Sampling(args.temperature, args.top_k, args.seed)
    check_arguments(args.prompt, args.tokens, sampling)
    run_dir = Path(args.run_dir)
    model, _ = load_run_model(run_dir)
    encode, decode = run_codec(run_dir)  # the run's --tokenizer
    prompt = encode(args.prompt)
    continuation = generate(model, prompt, args.tokens, sampling)
    print(decode(prompt + continuation))
    return 0


if __name__ == "__main__":
    run_cli(main)
