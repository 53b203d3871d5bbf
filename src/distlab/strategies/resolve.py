"""From YAML and flags to a config its strategy accepts: how every command builds a Config.

``distlab.config`` declares the fields and ``distlab.config_checks`` checks each on
its own (``check_fields``); whether a strategy can run the config (its options, its
degrees, the batch split over its data-parallel replicas) is the strategy's
to say, so the whole check lives here, above the strategies.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from distlab.config import Config, fixed_micro_batch, model_shape
from distlab.config_checks import check_fields, require
from distlab.config_reading import DEFAULTS, build_config, option_flag, read_config_values
from distlab.errors import DistlabError
from distlab.fault_spec import fault_specs
from distlab.strategies import registry


def load_config(
    path: str | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """A validated Config from ``base`` values, an optional YAML file and CLI overrides.

    Later sources win. ``base`` is what a resumed run inherits from its source
    run's ``config.yaml``.
    """
    values = read_config_values(path, overrides)
    config = build_config({**inheritable(base or {}, values.get("strategy")), **values})
    validate(config)
    return config


def inheritable(base: dict[str, Any], strategy: str | None) -> dict[str, Any]:
    """``base`` without the strategy options that ``strategy`` (if it replaces base's) ignores.

    A run resumed under another strategy inherits the source's training settings,
    not the source strategy's own flags (an fsdp run's ``reshard_after_forward``
    means nothing to ddp and would be refused).
    """
    if strategy is None or strategy == base.get("strategy") or strategy not in registry.names():
        return dict(base)
    ignored = set(registry.option_users()) - registry.get(strategy).options
    return {k: v for k, v in base.items() if k not in ignored}


def validate(config: Config) -> None:
    """Every field on its own, then what the strategy says of the whole; one-line errors."""
    check_fields(config)
    fault_specs(config)
    strategy = registry.get(config.strategy)
    refuse_unused_options(config, strategy.options, registry.option_users())
    if config.compile and strategy.compile_refusal:
        raise DistlabError(
            f"--compile is not supported by strategy '{config.strategy}': "
            f"{strategy.compile_refusal}"
        )
    if config.ac == "selective" and strategy.selective_ac_refusal:
        raise DistlabError(
            f"--ac selective is not supported by strategy '{config.strategy}': "
            f"{strategy.selective_ac_refusal}"
        )
    if model_shape(config).n_expert and config.compile:
        raise DistlabError(
            f"--compile cannot compile the mixture-of-experts model '{config.model}' yet: "
            "its experts' row counts are data-dependent shapes"
        )
    if model_shape(config).n_expert and not strategy.trains_moe:
        moe = ", ".join(n for n in registry.names() if registry.get(n).trains_moe)
        raise DistlabError(
            f"strategy '{config.strategy}' cannot train the mixture-of-experts model "
            f"'{config.model}'; use one of: {moe}"
        )
    strategy.validate(config)
    check_live(config)
    dp = strategy.data_parallel_size(config)
    if config.global_batch % dp:
        raise DistlabError(
            f"global_batch {config.global_batch} is not divisible by the data-parallel size "
            f"{dp}; use a multiple of {dp}"
        )
    local = config.global_batch // dp
    micro = fixed_micro_batch(config)
    if micro is not None:
        if micro < 1:
            raise DistlabError("micro_batch must be >= 1")
        if local % micro:
            raise DistlabError(
                f"micro_batch {micro} does not divide the per-rank batch {local} "
                f"(global_batch {config.global_batch} / data-parallel size {dp})"
            )


def check_live(config: Config) -> None:
    """One-line errors for ``--ft live`` where it cannot run (``distlab.train.live``): a
    strategy whose ranks are not whole replicas, a single replica, a save-stage fault on a
    replica that never saves, or torchft not installed."""
    if config.ft != "live":
        return
    require(
        config.strategy != "hsdp",
        "--ft live recovers ddp replicas only: hsdp's replicate dimension is not supported "
        "yet (use --strategy ddp, or --ft restart)",
    )
    require(
        config.strategy == "ddp",
        f"--ft live needs ranks that are whole replicas of the model: strategy "
        f"'{config.strategy}' has no replica dimension live recovery supports "
        "(use --strategy ddp, or --ft restart)",
    )
    require(
        config.nproc >= 2,
        f"--ft live needs at least 2 replicas, so one keeps stepping (got nproc {config.nproc})",
    )
    elsewhere = [spec.name for spec in fault_specs(config) if spec.during_save and spec.rank]
    require(
        not elsewhere,
        f"inject_fault '{elsewhere[0] if elsewhere else ''}' never fires under --ft live: "
        "only replica 0 saves checkpoints",
    )
    require(
        importlib.util.find_spec("torchft") is not None,
        "--ft live needs torchft, an optional extra: pip install 'distlab[ft]'",
    )


def refuse_unused_options(
    config: Config, used: frozenset[str], users: dict[str, list[str]]
) -> None:
    """One-line error for a strategy option set away from its default that the strategy ignores.

    ``used``: the options of ``config.strategy``; ``users``: every strategy option and
    the strategies that use it (both declared by the strategies themselves).
    """
    for name, strategies in users.items():
        value = getattr(config, name)
        if name not in used and value != DEFAULTS[name]:
            raise DistlabError(
                f"{option_flag(name, value)} is not used by strategy '{config.strategy}'; "
                f"drop it, or choose a strategy that uses it: {', '.join(strategies)}"
            )
