"""HfHub: the hub interface over ``huggingface_hub.HfApi`` (the Hugging Face Hub or any Hub-compatible endpoint).

Errors are mapped to the project's (:mod:`sorlora_gossip.hub.base`): 412 on a stale ``parent_commit`` becomes
:class:`PushConflictError`, 404s become ``RepoNotFound``/``RevisionNotFound``/``EntryNotFound``. Rate limits (429),
server errors (5xx) and connection failures are retried a bounded number of times with exponential backoff, then
raise :class:`HubUnavailable`. Downloads go through ``hf_hub_download`` with a pinned revision into a cache folder.
The token is passed to ``HfApi`` only; it never appears in ``repr``, logs or error messages raised here.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .base import (
    DEFAULT_BRANCH,
    SHA_RE,
    CommitEntry,
    EntryNotFound,
    FileSource,
    Hub,
    HubAuthError,
    HubError,
    HubUnavailable,
    PushConflictError,
    RefExistsError,
    Refs,
    RepoNotFound,
    RevisionNotFound,
    validate_path,
    validate_ref,
    validate_repo_id,
)

__all__ = ["HfHub", "RETRYABLE_STATUS"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _transient(exc: BaseException) -> bool:
    """True for errors worth retrying: 429/5xx answers and connection failures (also behind a cache miss)."""
    if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ is not None:
        return _transient(exc.__cause__)
    if isinstance(exc, (httpx2.ConnectError, httpx2.TimeoutException, httpx2.RemoteProtocolError)):
        return True
    return isinstance(exc, HfHubHTTPError) and _status(exc) in RETRYABLE_STATUS


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class HfHub(Hub):
    """The hub interface over ``HfApi(endpoint=..., token=...)``.

    ``namespace``: the user or organisation owning the peers' repos (default: the token's user, via ``whoami``).
    ``private``: visibility of the repos this hub creates (``None``: the namespace's default).
    ``max_retries``/``backoff``/``max_backoff``: bounded retry of 429/5xx, waiting ``backoff * 2**attempt`` seconds
    (capped, with jitter, or the server's ``Retry-After`` if shorter than ``max_backoff``).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        token: str | None = None,
        *,
        namespace: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        private: bool | None = None,
    ) -> None:
        self._api = HfApi(endpoint=endpoint, token=token)
        self._token = token
        self.endpoint = self._api.endpoint
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self._namespace = namespace
        self.private = private
        if namespace is not None:
            validate_repo_id(f"{namespace}/x")

    def __repr__(self) -> str:
        return (
            f"HfHub(endpoint={self.endpoint!r}, namespace={self._namespace!r}, token={'***' if self._token else None})"
        )

    @property
    def namespace(self) -> str:  # type: ignore[override]
        """The owner of the peers' repos (asks the endpoint who the token belongs to if not given)."""
        if self._namespace is None:
            self._namespace = validate_repo_id(f"{self._call('whoami', self._api.whoami)['name']}/x").split("/")[0]
        return self._namespace

    # -- error mapping and retries -----------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # mapped below; nothing is swallowed
                if not _transient(exc):
                    raise self._map(what, exc) from exc
                if attempt >= self.max_retries:
                    raise HubUnavailable(
                        f"{what}: endpoint {self.endpoint} still failing after {attempt + 1} attempts "
                        f"({_first_line(exc)})"
                    ) from exc
                delay = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)
                retry_after = getattr(getattr(exc, "response", None), "headers", {}).get("Retry-After")
                if retry_after is not None:
                    try:
                        delay = min(self.max_backoff, max(0.0, float(retry_after)))
                    except ValueError:
                        pass
                logger.warning("%s: transient error (%s), retry %d/%d in %.2fs", what, _first_line(exc),
                               attempt + 1, self.max_retries, delay)  # fmt: skip
                time.sleep(delay)
                attempt += 1

    def _map(self, what: str, exc: Exception) -> Exception:
        message = f"{what}: {_first_line(exc)}"
        if isinstance(exc, RepositoryNotFoundError):
            return RepoNotFound(message) if _status(exc) not in (401, 403) else HubAuthError(message)
        if isinstance(exc, RevisionNotFoundError):
            return RevisionNotFound(message)
        if isinstance(exc, RemoteEntryNotFoundError):
            return EntryNotFound(message)
        if isinstance(exc, HfHubHTTPError):
            status = _status(exc)
            if status == 412:
                return PushConflictError(message)
            if status == 409:
                return RefExistsError(message)
            if status in (401, 403):
                return HubAuthError(message)
            return HubError(message)
        if isinstance(exc, (LocalEntryNotFoundError, httpx2.HTTPError)):
            return HubError(message)
        return exc

    # -- Hub interface -----------------------------------------------------------------------------------------

    def create_repo(self, repo_id: str, *, exist_ok: bool = True) -> None:
        """Create the model repo ``repo_id`` (idempotent with ``exist_ok``)."""
        validate_repo_id(repo_id)
        try:
            self._api.create_repo(repo_id, exist_ok=False, private=self.private)
        except HfHubHTTPError as exc:
            if _status(exc) == 409:
                if exist_ok:
                    return
                raise RefExistsError(f"repository {repo_id!r} already exists") from exc
            if not _transient(exc):
                raise self._map(f"create_repo {repo_id}", exc) from exc
            # a transient failure: the repo may or may not have been created; retry idempotently
            self._call(f"create_repo {repo_id}", self._api.create_repo, repo_id, exist_ok=True, private=self.private)

    def list_repos(self, namespace: str | None = None) -> list[str]:
        """Model repo ids owned by ``namespace`` (default: this hub's)."""
        author = namespace or self.namespace
        validate_repo_id(f"{author}/x")
        models = self._call(f"list_repos {author}", lambda: list(self._api.list_models(author=author)))
        return sorted(m.id for m in models if m.id.startswith(f"{author}/"))

    def create_commit(
        self,
        repo_id: str,
        files: Mapping[str, FileSource],
        *,
        commit_message: str,
        parent_commit: str | None = None,
        revision: str = DEFAULT_BRANCH,
    ) -> str:
        """Commit ``files`` on branch ``revision`` (see :meth:`Hub.create_commit`)."""
        validate_repo_id(repo_id)
        validate_ref(revision)
        if parent_commit is not None and not SHA_RE.fullmatch(parent_commit):
            raise ValueError(f"parent_commit must be a 40-hex commit sha, got {parent_commit!r}")
        contents = {
            validate_path(p): (src.read_bytes() if isinstance(src, Path) else bytes(src)) for p, src in files.items()
        }

        def commit() -> str:
            operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=data) for p, data in contents.items()]
            info = self._api.create_commit(
                repo_id,
                operations,
                commit_message=commit_message,
                parent_commit=parent_commit,
                revision=revision,
            )
            return info.oid

        return self._call(f"create_commit {repo_id}@{revision}", commit)

    def create_tag(self, repo_id: str, tag: str, *, revision: str = DEFAULT_BRANCH, exist_ok: bool = False) -> None:
        """Tag the commit ``revision`` resolves to."""
        validate_repo_id(repo_id)
        validate_ref(tag)
        sha = self.resolve(repo_id, revision)
        try:
            self._call(f"create_tag {repo_id} {tag}", self._api.create_tag, repo_id, tag=tag, revision=sha)
        except RefExistsError:
            if not exist_ok:
                raise RefExistsError(f"tag {tag!r} already exists in {repo_id!r}") from None

    def resolve(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> str:
        """The commit sha of a branch, tag or sha (``repo_info(...).sha``)."""
        validate_repo_id(repo_id)
        info = self._call(f"resolve {repo_id}@{revision}", self._api.model_info, repo_id, revision=revision)
        if not info.sha:
            raise HubError(f"resolve {repo_id}@{revision}: endpoint returned no commit sha")
        return info.sha

    def download(self, repo_id: str, filename: str, *, revision: str) -> Path:
        """``hf_hub_download`` at ``revision`` into the cache (no HTTP call when that sha is cached already)."""
        validate_repo_id(repo_id)
        validate_path(filename)
        path = self._call(
            f"download {repo_id}/{filename}@{revision}",
            hf_hub_download,
            repo_id,
            filename,
            revision=revision,
            endpoint=self.endpoint,
            token=self._token,
            cache_dir=self.cache_dir,
        )
        return Path(path)

    def list_files(self, repo_id: str, *, revision: str = DEFAULT_BRANCH) -> list[str]:
        """Sorted file paths at ``revision``."""
        validate_repo_id(repo_id)
        info = self._call(f"list_files {repo_id}@{revision}", self._api.model_info, repo_id, revision=revision)
        return sorted(s.rfilename for s in info.siblings or [] if s.rfilename != ".gitattributes")

    def list_commits(self, repo_id: str, *, revision: str = DEFAULT_BRANCH) -> list[CommitEntry]:
        """History from ``revision``, newest first."""
        validate_repo_id(repo_id)
        commits = self._call(
            f"list_commits {repo_id}@{revision}", self._api.list_repo_commits, repo_id, revision=revision
        )
        return [
            CommitEntry(sha=c.commit_id, message=c.title, created_at=c.created_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
            for c in commits
        ]

    def list_refs(self, repo_id: str) -> Refs:
        """Branches and tags of ``repo_id``."""
        validate_repo_id(repo_id)
        refs = self._call(f"list_refs {repo_id}", self._api.list_repo_refs, repo_id)
        return Refs(
            branches={b.name: b.target_commit for b in refs.branches},
            tags={t.name: t.target_commit for t in refs.tags},
        )
