"""The one exception type distlab shows to users as a one-line error, and how to make that line."""

from __future__ import annotations


class DistlabError(Exception):
    """A user-facing error: bad input or an impossible setting.

    The command-line entry points print ``distlab: error: <message>`` and exit
    with status 2 instead of showing a traceback. The message should say what
    to change.
    """


NOISE = ("Traceback", "File ", "^", "The above exception", "During handling")
"""Lines of a library's message that never tell what went wrong (traceback plumbing)."""
TELLING = ("Error", "error", "died", "killed", "key")
"""Words of the lines that usually do."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The most telling line of a library's error (torch, DCP, Ray, W&B), for a one-line error.

    Traceback plumbing is skipped; the first line naming an error, a death or a
    missing key wins; else the first line; else the exception's type.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(NOISE)] or lines
    telling = [line for line in lines if any(word in line for word in TELLING)]
    return (telling or lines or [type(exc).__name__])[0][:limit]
