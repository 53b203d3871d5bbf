"""From YAML files and flag values to a ``Config``: each field's type and default, the
conversion of a raw value to its field's type, and how a field reads as a flag.

Only types are checked here: ``distlab.strategies.resolve.load_config`` is the way to a
Config that its strategy accepts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from distlab.config import AUTO, Config
from distlab.errors import DistlabError

FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Config)}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}


def _coerce(name: str, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type or raise DistlabError."""
    kind = FIELD_TYPES[name]
    if value is None:
        if "None" in kind:
            return None
        raise DistlabError(f"config field '{name}' must not be empty")
    try:
        if kind.startswith("int | str"):  # a number or auto (micro_batch)
            if str(value).strip().lower() == AUTO:
                return AUTO
            kind = f"a number or {AUTO}"
            return _coerce_int(value)
        if kind.startswith("int"):
            return _coerce_int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("bool"):
            if isinstance(value, str):
                lowered = value.lower()
                if lowered in ("true", "yes", "on", "1"):
                    return True
                if lowered in ("false", "no", "off", "0"):
                    return False
                raise ValueError
            return bool(value)
        return str(value)
    except (TypeError, ValueError):
        raise DistlabError(
            f"config field '{name}' expects {kind.split(' |')[0]}, got {value!r}"
        ) from None


def _coerce_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError
    return int(value)


def read_yaml_mapping(file: Path, label: str, holds: str = "a mapping") -> dict[str, Any]:
    """The top-level mapping of a YAML file; a one-line DistlabError naming ``label`` if not."""
    try:
        loaded = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DistlabError(f"{label} is not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise DistlabError(f"{label} must hold {holds}")
    return loaded


def read_config_values(
    path: str | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The raw field values of an optional YAML file and CLI overrides (which win)."""
    values: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise DistlabError(f"config file not found: {path} (pass an existing --config FILE)")
        values.update(read_yaml_mapping(file, f"config file {path}", "a mapping of field: value"))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return values


def build_config(values: dict[str, Any]) -> Config:
    """A Config of raw field values, each converted to its field's type; unknown fields refused.

    Only types are checked here: ``distlab.strategies.resolve.load_config`` is the
    way to a Config that its strategy accepts (``check_fields`` plus the strategy).
    """
    values = dict(values)
    if isinstance(values.get("inject_fault"), list | tuple):
        values["inject_fault"] = ",".join(str(v) for v in values["inject_fault"])
    unknown = sorted(set(values) - set(FIELD_TYPES))
    if unknown:
        raise DistlabError(
            f"unknown config field '{unknown[0]}' (valid fields: {', '.join(FIELD_TYPES)})"
        )
    return Config(**{k: _coerce(k, v) for k, v in values.items()})


def option_flag(name: str, value: Any) -> str:
    """How a field set to ``value`` reads on the command line (``--tp 2``, ``--no-x``)."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value}"
