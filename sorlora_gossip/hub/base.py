"""The hub interface every gossip backend implements, its error types, and repo-id / path validation.

A hub stores one git-like repository per peer: immutable commits of whole file trees, branches (``main``) and tags
(``round-0007``). Backends: :class:`sorlora_gossip.hub.local.LocalHub` (a folder) and :class:`sorlora_gossip.hub.hf.HfHub` (the
Hugging Face Hub or any Hub-compatible endpoint). Both raise the errors below and nothing backend-specific.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_BRANCH",
    "CommitEntry",
    "EntryNotFound",
    "Hub",
    "HubAuthError",
    "HubError",
    "HubUnavailable",
    "InvalidNameError",
    "PushConflictError",
    "RefExistsError",
    "RepoNotFound",
    "RevisionNotFound",
    "Refs",
    "validate_path",
    "validate_ref",
    "validate_repo_id",
]

DEFAULT_BRANCH = "main"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PATH_PART = re.compile(r"[A-Za-z0-9._-][A-Za-z0-9._ +=@,-]{0,254}")
SHA_RE = re.compile(r"[0-9a-f]{40}")


class HubError(Exception):
    """Base class of every error a hub backend raises."""


class PushConflictError(HubError):
    """The branch moved since ``parent_commit``: re-read the head and retry (optimistic concurrency)."""


class RepoNotFound(HubError):
    """The repository does not exist (or is not visible with these credentials)."""


class RevisionNotFound(HubError):
    """The repository exists but the branch, tag or commit does not."""


class EntryNotFound(HubError):
    """The revision exists but holds no file of that name."""


class RefExistsError(HubError):
    """A tag or branch of that name already exists."""


class HubAuthError(HubError):
    """The endpoint refused the credentials (HTTP 401/403)."""


class HubUnavailable(HubError):
    """The endpoint kept failing (429 or 5xx, connection errors) after the bounded retries."""


class InvalidNameError(HubError, ValueError):
    """A repo id, ref or file path that could escape the hub's namespace (``..``, absolute, odd characters)."""


def validate_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it is ``namespace/name`` with safe parts; raise :class:`InvalidNameError` otherwise."""
    if not isinstance(repo_id, str):
        raise InvalidNameError(f"repo id must be a string, got {type(repo_id).__name__}")
    parts = repo_id.split("/")
    if (
        len(parts) != 2
        or not all(_NAME.fullmatch(p) for p in parts)
        or any(".." in p or p.endswith(".") for p in parts)
    ):
        raise InvalidNameError(
            f"invalid repo id {repo_id!r}: expected 'namespace/name' of letters, digits, '.', '_', '-' "
            "(no '..', no leading '.', no absolute path)"
        )
    return repo_id


def validate_ref(ref: str) -> str:
    """Return ``ref`` (a branch or tag name) if it is safe; raise :class:`InvalidNameError` otherwise."""
    if not isinstance(ref, str) or not _REF.fullmatch(ref) or ".." in ref or ref.endswith((".", ".lock")):
        raise InvalidNameError(f"invalid ref name {ref!r}: letters, digits, '.', '_', '-' only, no '..'")
    return ref


def validate_path(path: str) -> str:
    """Return ``path`` if it is a relative POSIX path inside a repo; raise :class:`InvalidNameError` otherwise."""
    if not isinstance(path, str) or not path:
        raise InvalidNameError(f"invalid path in repo {path!r}: must be a non-empty string")
    if path.startswith("/") or "\\" in path or ":" in path:
        raise InvalidNameError(f"invalid path in repo {path!r}: absolute paths and backslashes are refused")
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", "..") or not _PATH_PART.fullmatch(part):
            raise InvalidNameError(f"invalid path in repo {path!r}: empty, '.' or '..' segment or odd characters")
    if parts[0] in (".git", ".hub"):
        raise InvalidNameError(f"invalid path in repo {path!r}: reserved folder {parts[0]!r}")
    return path


@dataclass(frozen=True)
class CommitEntry:
    """One commit of a repo's history: its sha, summary message and creation time (ISO 8601, UTC)."""

    sha: str
    message: str
    created_at: str


@dataclass(frozen=True)
class Refs:
    """A repo's branches and tags, each name -> commit sha."""

    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


FileSource = bytes | Path


class Hub(ABC):
    """A store of peer repositories with git-like commits, branches and tags (see the module docstring)."""

    namespace: str

    def repo_id(self, name: str) -> str:
        """The full repo id of ``name`` in this hub's namespace (``namespace/name``), validated."""
        return validate_repo_id(f"{self.namespace}/{name}")

    @abstractmethod
    def create_repo(self, repo_id: str, *, exist_ok: bool = True) -> None:
        """Create ``repo_id`` with an initial commit on ``main``; an existing repo is fine when ``exist_ok``."""

    @abstractmethod
    def list_repos(self, namespace: str | None = None) -> list[str]:
        """Repo ids under ``namespace`` (default: this hub's), sorted."""

    @abstractmethod
    def create_commit(
        self,
        repo_id: str,
        files: Mapping[str, FileSource],
        *,
        commit_message: str,
        parent_commit: str | None = None,
        revision: str = DEFAULT_BRANCH,
    ) -> str:
        """Add/overwrite ``files`` (path -> bytes or local file) as one commit on branch ``revision``; return its sha.

        With ``parent_commit`` the commit is made only if the branch head is still that commit, otherwise
        :class:`PushConflictError`. Files identical to the head make no commit: the head sha is returned.
        """

    @abstractmethod
    def create_tag(self, repo_id: str, tag: str, *, revision: str = DEFAULT_BRANCH, exist_ok: bool = False) -> None:
        """Tag the commit ``revision`` resolves to; an existing tag raises :class:`RefExistsError` unless ``exist_ok``."""

    @abstractmethod
    def resolve(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> str:
        """The 40-hex commit sha a branch, tag or sha designates."""

    @abstractmethod
    def download(self, repo_id: str, filename: str, *, revision: str) -> Path:
        """A local, read-only copy of ``filename`` at ``revision`` (cached; pass a commit sha to pin it)."""

    @abstractmethod
    def list_files(self, repo_id: str, *, revision: str = DEFAULT_BRANCH) -> list[str]:
        """Sorted paths of the files in the tree at ``revision``."""

    @abstractmethod
    def list_commits(self, repo_id: str, *, revision: str = DEFAULT_BRANCH) -> list[CommitEntry]:
        """History reachable from ``revision``, newest first (the initial commit last)."""

    @abstractmethod
    def list_refs(self, repo_id: str) -> Refs:
        """The repo's branches and tags."""

    def read_bytes(self, repo_id: str, filename: str, *, revision: str) -> bytes:
        """The content of ``filename`` at ``revision`` (through :meth:`download`, so it is cached)."""
        return self.download(repo_id, filename, revision=revision).read_bytes()

    def repo_exists(self, repo_id: str) -> bool:
        """True when ``repo_id`` exists on this hub."""
        try:
            self.resolve(repo_id)
        except RepoNotFound:
            return False
        return True
