"""The one exception type distlab shows to users as a one-line error."""

from __future__ import annotations


class DistlabError(Exception):
    """A user-facing error: bad input or an impossible setting.

    The command-line entry points print ``distlab: error: <message>`` and exit
    with status 2 instead of showing a traceback. The message should say what
    to change.
    """
