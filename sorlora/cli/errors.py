"""The one place that turns a known error into one line: what is wrong and what to do, with exit code 2.

A user error (a bad ``--set`` value, a missing file, a run directory that is a file, a data source that cannot be
fetched, a hub that is down or refuses the token, a busy port) is printed as ``sorlora COMMAND: error: ...``;
anything else is a bug and keeps its traceback. ``-v`` adds the traceback to the line, for bug reports.
"""

from __future__ import annotations

import argparse
import errno
import os

__all__ = ["USAGE_ERROR", "UsageError", "explain", "one_line"]

USAGE_ERROR = 2  # exit code of every user error (as argparse uses for bad options)


class UsageError(Exception):
    """A user error found by the CLI itself: printed as one ``error: ...`` line, exit code 2."""


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def explain(exc: BaseException, args: argparse.Namespace) -> str | None:
    """The one line for a user error, or None for anything else (a bug: its traceback is shown)."""
    from sorlora_gossip.hub import HubAuthError, HubError, HubUnavailable  # noqa: PLC0415 - `--help` stays fast

    from ..data.sources import DataSourceError  # noqa: PLC0415

    if isinstance(exc, DataSourceError):  # the whole line: it ends with what to do
        return " ".join(str(exc).split())
    token_env = getattr(args, "token_env", "HF_TOKEN")
    if isinstance(exc, HubAuthError) and not os.environ.get(token_env):
        return f"the hub needs a token for this ({one_line(exc)}) and ${token_env} is not set: export {token_env}=..."
    if isinstance(exc, HubAuthError):
        return f"the hub refused the credentials ({one_line(exc)}): check the token in ${token_env}"
    if isinstance(exc, HubUnavailable):
        return f"the hub is unreachable ({one_line(exc)}): check the endpoint URL and that the hub is up"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        where = f"{getattr(args, 'host', '')}:{getattr(args, 'port', '')}"
        return f"address {where} is already in use: choose another --port or stop the program serving it"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, PermissionError)) and exc.filename and exc.strerror:
        return f"{exc.filename!r}: {exc.strerror.lower()} (check the path)"
    if isinstance(exc, (UsageError, HubError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError)):
        return one_line(exc)
    if isinstance(exc, (IsADirectoryError, FileExistsError)):
        return one_line(exc)
    return None
