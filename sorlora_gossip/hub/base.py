"""The hub interface every gossip backend implements, its error types, and repo-id / path validation.

A hub stores one git-like repository per peer: immutable commits of whole file trees, branches (``main``) and tags
(``round-0007``). Backends: :class:`sorlora_gossip.hub.local.LocalHub` (a folder) and :class:`sorlora_gossip.hub.hf.HfHub` (the
Hugging Face Hub or any Hub-compatible endpoint). Both raise the errors below and nothing backend-specific.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEFAULT_BRANCH",
    "ERROR_STATUS",
    "CommitEntry",
    "EndpointNotSupported",
    "EntryNotFound",
    "Hub",
    "HubAuthError",
    "HubError",
    "HubForbidden",
    "HubUnavailable",
    "InvalidNameError",
    "PushConflictError",
    "RefExistsError",
    "RepoNotFound",
    "RequestTooLarge",
    "RevisionNotFound",
    "Refs",
    "SecondWriterError",
    "check_sources",
    "check_tree",
    "deadline",
    "error_for_status",
    "status_for_error",
    "time_left",
    "validate_path",
    "validate_ref",
    "validate_repo_id",
    "validate_revision",
]

DEFAULT_BRANCH = "main"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PATH_PART = re.compile(r"[A-Za-z0-9._-][A-Za-z0-9._ +=@,-]{0,254}")
SHA_RE = re.compile(r"[0-9a-f]{40}")


class HubError(Exception):
    """Base class of every error a hub backend raises; ``repo_id``/``revision`` name what it was about (or None)."""

    def __init__(self, message: str = "", *, repo_id: str | None = None, revision: str | None = None) -> None:
        super().__init__(message)
        self.repo_id, self.revision = repo_id, revision


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
    """The endpoint refused the request: no or invalid credentials (HTTP 401), or see :class:`HubForbidden`."""


class HubForbidden(HubAuthError):
    """The credentials are valid but this user may not do this (HTTP 403): another user's repo, tag or file."""


class RequestTooLarge(HubError):
    """A request body or a file is over the size limit (HTTP 413)."""


class EndpointNotSupported(HubError):
    """The endpoint does not implement an optional part of the Hub API (validate-yaml, repo listing)."""


class HubUnavailable(HubError):
    """The endpoint kept failing (429 or 5xx, connection errors) after the bounded retries."""


class InvalidNameError(HubError, ValueError):
    """A repo id, ref or file path that could escape the hub's namespace (``..``, absolute, odd characters)."""


class SecondWriterError(HubError):
    """Another live writer pushes the same peer id: its repo's history no longer extends the one this writer saw."""


# One table for both sides of the wire: the server answers ``status`` (and ``X-Error-Code``) for an error, the
# client maps them back (as ``huggingface_hub.utils.hf_raise_for_status`` does for the Hub). Most specific first.
ERROR_STATUS: tuple[tuple[type[HubError], int, str | None], ...] = (
    (RepoNotFound, 404, "RepoNotFound"),
    (RevisionNotFound, 404, "RevisionNotFound"),
    (EntryNotFound, 404, "EntryNotFound"),
    (InvalidNameError, 400, "InvalidName"),
    (PushConflictError, 412, None),
    (RefExistsError, 409, None),
    (HubForbidden, 403, None),
    (HubAuthError, 401, None),
    (RequestTooLarge, 413, None),
    (EndpointNotSupported, 405, None),
    (HubUnavailable, 503, None),
)


def status_for_error(exc: HubError) -> tuple[int, str | None]:
    """The HTTP status and ``X-Error-Code`` a server answers for ``exc`` (500 for an unlisted error)."""
    for cls, status, code in ERROR_STATUS:
        if isinstance(exc, cls):
            return status, code
    return 500, None


def error_for_status(
    status: int | None,
    code: str | None,
    message: str,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
) -> HubError:
    """The project error for an HTTP answer: by ``X-Error-Code`` first, then by status (:data:`ERROR_STATUS`)."""
    for cls, _, cls_code in ERROR_STATUS:
        if code is not None and code == cls_code:
            return cls(message, repo_id=repo_id, revision=revision)
    if status == 404:
        return (RevisionNotFound if revision is not None else RepoNotFound)(message, repo_id=repo_id, revision=revision)
    for cls, cls_status, cls_code in ERROR_STATUS:
        if status == cls_status and cls_code is None:
            return cls(message, repo_id=repo_id, revision=revision)
    if status is not None and 500 <= status < 600:
        return HubUnavailable(message, repo_id=repo_id, revision=revision)
    if status == 400:
        return InvalidNameError(message, repo_id=repo_id, revision=revision)
    return HubError(message, repo_id=repo_id, revision=revision)


_DEADLINE: ContextVar[float | None] = ContextVar("sorlora_gossip_hub_deadline", default=None)


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Within this block, hub calls stop retrying once ``seconds`` have passed (nested blocks keep the earliest)."""
    end = time.monotonic() + max(0.0, seconds)
    outer = _DEADLINE.get()
    token = _DEADLINE.set(end if outer is None else min(outer, end))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def time_left() -> float | None:
    """Seconds left before the current :func:`deadline` (None outside one)."""
    end = _DEADLINE.get()
    return None if end is None else end - time.monotonic()


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
    if SHA_RE.fullmatch(ref.lower()):
        raise InvalidNameError(f"invalid ref name {ref!r}: a branch or tag may not look like a commit sha")
    return ref


def validate_revision(revision: str) -> str:
    """Return ``revision`` if it is a full commit sha or a valid ref name; a 40-hex name is always a commit."""
    if isinstance(revision, str) and SHA_RE.fullmatch(revision):
        return revision
    return validate_ref(revision)


def check_tree(paths: Iterable[str]) -> None:
    """Refuse a tree holding both a file ``a`` and a file under ``a/`` (no filesystem or git tree can hold both)."""
    files = set(paths)
    for path in files:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in files:
                raise InvalidNameError(f"invalid path in repo {path!r}: {'/'.join(parts[:i])!r} is a file")


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
    """One commit of a repo's history: its sha, summary message, creation time (ISO 8601, UTC) and ``authors``: the
    users the hub authenticated for it (on the Hub and on ``hub-serve`` with tokens, the writer's user name; empty
    where an open hub authenticated nobody). Only the hub writes ``authors``: a committer cannot choose them, which
    is what makes them evidence of who wrote a file (:mod:`sorlora.protocol.collab` reads them)."""

    sha: str
    message: str
    created_at: str
    authors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Refs:
    """A repo's branches and tags, each name -> commit sha."""

    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


FileSource = bytes | Path


def check_sources(files: Mapping[str, FileSource | bytearray | memoryview]) -> dict[str, FileSource]:
    """Validate a commit's files once: safe paths, no ``a`` beside ``a/b``, bytes or an existing local file each."""
    checked: dict[str, FileSource] = {}
    for path, source in files.items():
        validate_path(path)
        if isinstance(source, (bytearray, memoryview)):
            source = bytes(source)
        if isinstance(source, Path):
            if not source.is_file():
                raise ValueError(f"file {path!r}: {source} is not a file")
        elif not isinstance(source, bytes):
            raise ValueError(f"file {path!r} must be bytes or a pathlib.Path, got {type(source).__name__}")
        checked[path] = source
    check_tree(checked)
    return checked


def source_size(source: FileSource) -> int:
    """Bytes in a commit source (a local file is not read)."""
    return source.stat().st_size if isinstance(source, Path) else len(source)


class Hub(ABC):
    """A store of peer repositories with git-like commits, branches and tags (see the module docstring).

    Each public operation is a template method: it validates its arguments here, once, and calls the backend's
    ``_operation`` that only moves data. Every error is a :class:`HubError` carrying ``repo_id``/``revision``.
    """

    namespace: str

    def repo_id(self, name: str) -> str:
        """The full repo id of ``name``: ``name`` itself when it is one (``ns/name``), else ``namespace/name``."""
        if isinstance(name, str) and "/" in name:
            return validate_repo_id(name)
        return validate_repo_id(f"{self.namespace}/{name}")

    # -- operations (validated here; the backend moves the data) -----------------------------------------------

    def create_repo(self, repo_id: str, *, exist_ok: bool = True, private: bool | None = None) -> None:
        """Create ``repo_id`` with an initial commit on ``main``; an existing repo is fine when ``exist_ok``.

        ``private``: readable by its owner only (``None``: the backend's default)."""
        self._create_repo(validate_repo_id(repo_id), exist_ok=exist_ok, private=private)

    def list_repos(self, namespace: str | None = None) -> list[str]:
        """Repo ids under ``namespace`` (default: this hub's), sorted; :class:`EndpointNotSupported` where the
        endpoint cannot list (an optional part of the Hub API)."""
        namespace = namespace or self.namespace
        validate_repo_id(f"{namespace}/x")
        return sorted(self._list_repos(namespace))

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
        validate_repo_id(repo_id)
        validate_ref(revision)
        if not isinstance(commit_message, str) or not commit_message:
            raise ValueError("commit_message can't be empty")
        if parent_commit is not None and not (isinstance(parent_commit, str) and SHA_RE.fullmatch(parent_commit)):
            raise ValueError(f"parent_commit must be a 40-hex commit sha, got {parent_commit!r}")
        sources = check_sources(files)
        return self._create_commit(
            repo_id, sources, commit_message=commit_message, parent_commit=parent_commit, revision=revision
        )

    def create_tag(self, repo_id: str, tag: str, *, revision: str = DEFAULT_BRANCH, exist_ok: bool = False) -> None:
        """Tag the commit ``revision`` resolves to; an existing tag raises :class:`RefExistsError` unless ``exist_ok``
        (it is never moved)."""
        validate_ref(tag)
        sha = self.resolve(repo_id, revision)
        self._create_tag(repo_id, tag, sha, exist_ok=exist_ok)

    def delete_tag(self, repo_id: str, tag: str) -> None:
        """Delete tag ``tag`` (its commit stays); :class:`RevisionNotFound` if there is none."""
        validate_repo_id(repo_id)
        self._delete_tag(repo_id, validate_ref(tag))

    def resolve(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> str:
        """The 40-hex commit sha a branch, tag or sha designates (a 40-hex revision is always a commit, never a ref)."""
        validate_repo_id(repo_id)
        return self._resolve(repo_id, validate_revision(revision))

    def download(self, repo_id: str, filename: str, *, revision: str, max_bytes: int | None = None) -> Path:
        """A local, read-only copy of ``filename`` at ``revision`` (cached; pass a commit sha to pin it).

        ``max_bytes``: refuse (:class:`RequestTooLarge`) a file over that size before and while transferring it."""
        validate_repo_id(repo_id)
        validate_path(filename)
        return self._download(repo_id, filename, revision=validate_revision(revision), max_bytes=max_bytes)

    def file_sizes(self, repo_id: str, *, revision: str = DEFAULT_BRANCH) -> dict[str, int]:
        """Path -> size in bytes of every file at ``revision``, without downloading any."""
        validate_repo_id(repo_id)
        return dict(sorted(self._file_sizes(repo_id, revision=validate_revision(revision)).items()))

    def file_ids(self, repo_id: str, *, revision: str = DEFAULT_BRANCH) -> dict[str, str]:
        """Path -> git blob id of every file at ``revision``, without downloading any: equal ids, equal contents,
        so comparing two commits' ids finds the files a commit changed."""
        validate_repo_id(repo_id)
        return dict(sorted(self._file_ids(repo_id, revision=validate_revision(revision)).items()))

    def list_files(self, repo_id: str, *, revision: str = DEFAULT_BRANCH) -> list[str]:
        """Sorted paths of the files in the tree at ``revision``."""
        return list(self.file_sizes(repo_id, revision=revision))

    def list_commits(self, repo_id: str, *, revision: str = DEFAULT_BRANCH) -> list[CommitEntry]:
        """First-parent history reachable from ``revision``, newest first (the initial commit last)."""
        validate_repo_id(repo_id)
        return self._list_commits(repo_id, revision=validate_revision(revision))

    def list_refs(self, repo_id: str) -> Refs:
        """The repo's branches and tags."""
        validate_repo_id(repo_id)
        return self._list_refs(repo_id)

    def read_bytes(self, repo_id: str, filename: str, *, revision: str, max_bytes: int | None = None) -> bytes:
        """The content of ``filename`` at ``revision`` (through :meth:`download`, so it is cached and size-capped)."""
        return self.download(repo_id, filename, revision=revision, max_bytes=max_bytes).read_bytes()

    def repo_exists(self, repo_id: str) -> bool:
        """True when ``repo_id`` exists on this hub."""
        try:
            self.resolve(repo_id)
        except RepoNotFound:
            return False
        return True

    # -- what a backend implements ----------------------------------------------------------------------------

    @abstractmethod
    def _create_repo(self, repo_id: str, *, exist_ok: bool, private: bool | None) -> None: ...

    @abstractmethod
    def _list_repos(self, namespace: str) -> list[str]: ...

    @abstractmethod
    def _create_commit(
        self,
        repo_id: str,
        files: dict[str, FileSource],
        *,
        commit_message: str,
        parent_commit: str | None,
        revision: str,
    ) -> str: ...

    @abstractmethod
    def _create_tag(self, repo_id: str, tag: str, sha: str, *, exist_ok: bool) -> None: ...

    @abstractmethod
    def _delete_tag(self, repo_id: str, tag: str) -> None: ...

    @abstractmethod
    def _resolve(self, repo_id: str, revision: str) -> str: ...

    @abstractmethod
    def _download(self, repo_id: str, filename: str, *, revision: str, max_bytes: int | None) -> Path: ...

    @abstractmethod
    def _file_sizes(self, repo_id: str, *, revision: str) -> dict[str, int]: ...

    @abstractmethod
    def _file_ids(self, repo_id: str, *, revision: str) -> dict[str, str]: ...

    @abstractmethod
    def _list_commits(self, repo_id: str, *, revision: str) -> list[CommitEntry]: ...

    @abstractmethod
    def _list_refs(self, repo_id: str) -> Refs: ...


def too_large(repo_id: str, filename: str, revision: str, size: int, max_bytes: int) -> RequestTooLarge:
    """The error for a file over a download cap."""
    return RequestTooLarge(
        f"{repo_id}/{filename}@{revision} is {size} bytes, over the {max_bytes}-byte limit: not downloaded",
        repo_id=repo_id,
        revision=revision,
    )
