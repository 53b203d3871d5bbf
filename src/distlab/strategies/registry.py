"""Strategy names -> the class that implements them, imported only when needed.

Importing a strategy module must stay cheap (heavy libraries such as DeepSpeed
are imported inside ``prepare``), because the launcher validates the config,
and so describes the strategy, before it starts any rank.
"""

from __future__ import annotations

import importlib

from distlab.errors import DistlabError
from distlab.strategies.base import Strategy

STRATEGIES: dict[str, str] = {
    "single": "distlab.strategies.single:SingleStrategy",
    "ddp": "distlab.strategies.ddp:DDPStrategy",
    "fsdp": "distlab.strategies.fsdp:FSDPStrategy",
    "hsdp": "distlab.strategies.hsdp:HSDPStrategy",
    "ep": "distlab.strategies.expert_parallel:EPStrategy",
    "tp": "distlab.strategies.tensor_parallel:TPStrategy",
    "pp": "distlab.strategies.pipeline_parallel:PPStrategy",
    "cp": "distlab.strategies.context_parallel:CPStrategy",
    "fsdp+tp": "distlab.strategies.composed:FSDPTPStrategy",
    "ddp+pp": "distlab.strategies.composed:DDPPPStrategy",
    "fsdp+pp": "distlab.strategies.composed:FSDPPPStrategy",
    "fsdp+tp+pp": "distlab.strategies.composed:FSDPTPPPStrategy",
    "fsdp+cp": "distlab.strategies.composed:FSDPCPStrategy",
    "fsdp+cp+tp": "distlab.strategies.composed:FSDPCPTPStrategy",
    "fsdp+cp+pp": "distlab.strategies.composed:FSDPCPPPStrategy",
    "fsdp+cp+tp+pp": "distlab.strategies.composed:FSDPCPTPPPStrategy",
    "zero1": "distlab.strategies.deepspeed_zero:Zero1Strategy",
    "zero2": "distlab.strategies.deepspeed_zero:Zero2Strategy",
    "zero3": "distlab.strategies.deepspeed_zero:Zero3Strategy",
    "fairscale-oss": "distlab.strategies.fairscale_oss:FairscaleOSSStrategy",
    "fairscale-sdp": "distlab.strategies.fairscale_oss:FairscaleSDPStrategy",
}


def names() -> list[str]:
    """Every registered strategy name."""
    return list(STRATEGIES)


def option_users() -> dict[str, list[str]]:
    """Every strategy option (``Strategy.options``) -> the strategies that use it."""
    users: dict[str, list[str]] = {}
    for name in STRATEGIES:
        for option in sorted(get(name).options):
            users.setdefault(option, []).append(name)
    return users


def get(name: str) -> Strategy:
    """The strategy registered as ``name``; a one-line error for an unknown name."""
    if name not in STRATEGIES:
        raise DistlabError(f"unknown strategy '{name}' (choose one of: {', '.join(STRATEGIES)})")
    module_name, class_name = STRATEGIES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)()
