"""Everything the launcher checks and prepares before any rank starts."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from distlab.checkpoint.layout import DCP_FORMAT, META_FILE, newest_checkpoint
from distlab.checkpoint.verify import verify_checkpoint
from distlab.config import Config, model_label, model_shape, resolved_seq_len
from distlab.config_reading import FIELD_TYPES, read_yaml_mapping
from distlab.data import prepare_tokens, token_facts, validation_file
from distlab.distributed import resolve_device
from distlab.errors import DistlabError
from distlab.hf.directory import describe, read_shape
from distlab.run.files import CONFIG_FILE, METRICS_FILE
from distlab.tokenizer import TOKENIZER_FILE

NOT_INHERITED = ("run_dir", "resume", "init_from", "inject_fault", "ray_address")
"""Fields a resumed run does not take from its source run's config.yaml."""


def make_run_dir(config: Config) -> Path:
    """Create (or reuse, if empty) the run dir; one-line error if it cannot be written."""
    if config.run_dir:
        run_dir = Path(config.run_dir)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(config.runs_root) / f"{config.strategy}-n{config.nproc}-{stamp}"
    if (run_dir / METRICS_FILE).exists():
        raise DistlabError(
            f"run dir {run_dir} already holds a run; choose a new --run-dir (nothing was changed)"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as exc:
        raise DistlabError(
            f"run dir {run_dir} is not writable ({exc.strerror}); pass a writable --run-dir"
        ) from None
    return run_dir.resolve()


def resume_source(path: str) -> tuple[Path, Path | None]:
    """(run dir, checkpoint dir or None for "its newest") of a ``--resume`` argument."""
    target = Path(path)
    if not target.exists():
        raise DistlabError(f"--resume {path}: no such run dir or checkpoint")
    if (target / META_FILE).exists() or target.parent.name == "checkpoints":
        return target.parent.parent, target
    return target, None


def inherited_config(path: str) -> dict[str, Any]:
    """The source run's config.yaml as base values for a resumed run (empty if absent)."""
    run_dir, _ = resume_source(path)
    file = run_dir / CONFIG_FILE
    if not file.is_file():
        return {}
    values = read_yaml_mapping(file, f"--resume {path}: {file}", "a config")
    return {k: v for k, v in values.items() if k in FIELD_TYPES and k not in NOT_INHERITED}


def resolve_resume(config: Config) -> Config:
    """Check ``config.resume`` and pin it to one verified checkpoint dir (absolute).

    One-line errors for a missing or corrupt checkpoint, a run already at its
    last step, or a strategy-specific (non-DCP) checkpoint that this strategy
    or world size cannot load.
    """
    if not config.resume:
        return config
    run_dir, checkpoint = resume_source(config.resume)
    if checkpoint is None:
        checkpoint = newest_checkpoint(run_dir)
        if checkpoint is None:
            raise DistlabError(
                f"--resume {config.resume}: no complete checkpoint in {run_dir / 'checkpoints'} "
                "(a run saves one every --checkpoint-every steps and at its end)"
            )
    meta = verify_checkpoint(checkpoint)
    if meta["format"] != DCP_FORMAT and (
        meta["strategy"] != config.strategy or meta["world_size"] != config.nproc
    ):
        raise DistlabError(
            f"checkpoint {checkpoint} is in {meta['format']}'s own format, written by "
            f"{meta['strategy']} on {meta['world_size']} ranks; only --strategy "
            f"{meta['strategy']} --nproc {meta['world_size']} can resume it (DCP checkpoints "
            "of single/ddp/fsdp reshard to any of them)"
        )
    if meta["next_step"] >= config.steps:
        raise DistlabError(
            f"checkpoint {checkpoint} already holds all {config.steps} steps; "
            f"pass --steps N with N > {meta['next_step']} to continue it"
        )
    return dataclasses.replace(config, resume=str(checkpoint.resolve()))


def resolve_init_from(config: Config) -> Config:
    """Check ``config.init_from`` (files, shape) and pin it to an absolute path, before any rank
    starts: a one-line error for a missing directory or a shape other than the run's model."""
    if not config.init_from:
        return config
    directory = Path(config.init_from)
    try:
        shape = read_shape(directory)
    except DistlabError as exc:
        raise DistlabError(f"--init-from {exc}") from None
    if shape != model_shape(config):
        raise DistlabError(
            f"--init-from {directory} holds {describe(shape)}, but --model is "
            f"{model_label(config)} ({describe(model_shape(config))}); pass the --model "
            "(and --layers/--hidden/--heads/--vocab/--seq-len) it was trained with"
        )
    return dataclasses.replace(config, init_from=str(directory.resolve()))


def prepare_run(config: Config) -> tuple[Config, Path, Path]:
    """Check the device, the --init-from directory and the resume point, tokenise the data,
    create the run dir.

    Returns (config with the resume checkpoint pinned, token file, run dir).
    """
    device = resolve_device(config)
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    config = resolve_resume(config)
    token_file = prepare_tokens(
        config.data, config.eval_every > 0, config.tokenizer, config.data_column, config.data_split
    )
    facts = token_facts(token_file)
    # the tokenizer's vocabulary first: --init-from's shape is checked against the model's
    config = resolve_init_from(fit_vocabulary(config, facts["vocab_size"]))
    seq_len = resolved_seq_len(config)
    splits = {"data": facts}
    if config.eval_every:
        splits = {
            "training split": facts,
            "validation split": token_facts(validation_file(token_file)),
        }
    for name, split_facts in splits.items():
        tokens = split_facts["tokens"]
        if tokens < seq_len + 2:
            raise DistlabError(
                f"the {name} has {tokens} tokens, too few for seq_len {seq_len}; "
                "use more data or a shorter --seq-len"
            )
    run_dir = make_run_dir(config)
    tokenizer_file = facts.get("tokenizer_file")
    if tokenizer_file:  # the run keeps its tokenizer: export and generate read it from here
        shutil.copyfile(tokenizer_file, run_dir / TOKENIZER_FILE)
    return config, token_file, run_dir


def fit_vocabulary(config: Config, vocab: int) -> Config:
    """The model's embedding sized for the tokenizer's ``vocab`` ids: the tokenizer's size
    unless --vocab (or a resumed run's shape) fixes it, which must then hold every id."""
    model_vocab = model_shape(config).vocab_size
    if vocab == model_vocab:
        return config
    if config.vocab is None and config.resume is None:
        return dataclasses.replace(config, vocab=vocab)
    if vocab > model_vocab:
        whose = "the resumed run's model" if config.resume else f"--vocab {model_vocab}"
        fix = "resume with its own --tokenizer" if config.resume else "raise --vocab or drop it"
        raise DistlabError(
            f"--tokenizer {config.tokenizer} has {vocab} tokens, more than {whose} embeds "
            f"({model_vocab}); {fix}"
        )
    return config
