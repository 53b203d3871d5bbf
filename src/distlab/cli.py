"""Command-line plumbing shared by distlab's commands: flags from Config, one-line errors."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from distlab.config import Config
from distlab.errors import DistlabError

NOT_FLAGS: set[str] = set()


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"distlab: error: {message} (see --help)\n")
        sys.exit(2)


def field_docs() -> dict[str, str]:
    """Each Config field's docstring (the string literal written under it)."""
    tree = ast.parse(inspect.getsource(Config))
    docs: dict[str, str] = {}
    body = tree.body[0].body
    for node, following in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            if isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
                docs[node.target.id] = following.value.value
    return docs


def add_config_flags(parser: argparse.ArgumentParser, skip: set[str] = frozenset()) -> None:
    """Add ``--field-name`` for every Config field (booleans get ``--x/--no-x``)."""
    docs = field_docs()
    for field in dataclasses.fields(Config):
        if field.name in NOT_FLAGS | set(skip):
            continue
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        # argparse expands %-formats in help texts: a docstring's "90%" must be "90%%".
        help_text = f"{docs.get(field.name, '')} (default: {default})".replace("%", "%%")
        if field.type == "bool":
            parser.add_argument(
                flag,
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag, dest=field.name, default=None, metavar="VALUE", help=help_text
            )


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The Config fields that were given on the command line."""
    names = {f.name for f in dataclasses.fields(Config)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def run_cli(main: Callable[[], int]) -> NoReturn:
    """Run a command's main; turn DistlabError into ``distlab: error: ...`` and exit 2."""
    try:
        code = main()
    except DistlabError as exc:
        sys.stderr.write(f"distlab: error: {exc}\n")
        code = 2
    except KeyboardInterrupt:
        sys.stderr.write("distlab: interrupted\n")
        code = 130
    sys.exit(code)
