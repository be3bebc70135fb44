"""Hub backends for gossip: one interface (:class:`Hub`), a local folder (:class:`LocalHub`), the Hugging Face Hub or
any Hub-compatible endpoint (:class:`HfHub`), and a server exposing a local folder over the Hub API (:class:`HubServer`).
"""

from __future__ import annotations

import os
import re

from .base import (
    DEFAULT_BRANCH,
    ERROR_STATUS,
    CommitEntry,
    EndpointNotSupported,
    EntryNotFound,
    Hub,
    HubAuthError,
    HubError,
    HubForbidden,
    HubUnavailable,
    InvalidNameError,
    PushConflictError,
    RefExistsError,
    Refs,
    RepoNotFound,
    RequestTooLarge,
    RevisionNotFound,
    SecondWriterError,
    deadline,
    validate_path,
    validate_ref,
    validate_repo_id,
    validate_revision,
)
from .hf import HfHub
from .local import LocalHub
from .server import HubServer, load_tokens

__all__ = [
    "DEFAULT_BRANCH",
    "ERROR_STATUS",
    "CommitEntry",
    "EndpointNotSupported",
    "EntryNotFound",
    "HfHub",
    "Hub",
    "HubAuthError",
    "HubError",
    "HubForbidden",
    "HubServer",
    "HubUnavailable",
    "InvalidNameError",
    "LocalHub",
    "PushConflictError",
    "RefExistsError",
    "Refs",
    "RepoNotFound",
    "RequestTooLarge",
    "RevisionNotFound",
    "SecondWriterError",
    "deadline",
    "load_tokens",
    "open_hub",
    "validate_path",
    "validate_ref",
    "validate_repo_id",
    "validate_revision",
]


_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def open_hub(
    location: str | os.PathLike[str], *, namespace: str | None = None, token: str | None = None, **kwargs
) -> Hub:
    """A hub from a location: an ``http(s)://`` endpoint gives :class:`HfHub`, a folder path a :class:`LocalHub`.

    Any other ``scheme://`` (a typo such as ``htp://``) is refused with :class:`ValueError` instead of silently
    becoming a local folder of that name.
    """
    text = os.fspath(location)
    if text.startswith(("http://", "https://")):
        return HfHub(endpoint=text.rstrip("/"), token=token, namespace=namespace, **kwargs)
    if _URL_SCHEME.match(text):
        raise ValueError(f"hub location {text!r} has an unknown scheme: use http(s)://HOST[:PORT] or a folder path")
    return LocalHub(text, namespace=namespace or "gossip", **kwargs)
