"""HfHub: the hub interface over ``huggingface_hub.HfApi`` (the Hugging Face Hub or any Hub-compatible endpoint).

Errors are mapped to the project's through the one table :data:`sorlora_gossip.hub.base.ERROR_STATUS` (the server
answers from the same table): 412 on a stale ``parent_commit`` becomes :class:`PushConflictError`, 404s become
``RepoNotFound``/``RevisionNotFound``/``EntryNotFound`` by their ``X-Error-Code``, 401/403 ``HubAuthError``/
``HubForbidden``; every error carries ``repo_id``/``revision``. This class holds the one retry policy: rate limits
(429), server errors (5xx) and connection failures are retried a bounded number of times with exponential backoff,
never past the current :func:`~sorlora_gossip.hub.base.deadline`, then raise :class:`HubUnavailable`.

Downloads are its own streamed GETs of the ``resolve`` URL at a pinned commit (not ``hf_hub_download``, which retries
on its own and cannot cap a file's size): the size is checked against ``max_bytes`` from ``Content-Length`` before
any byte is read and again while streaming, the git blob id (``ETag``) is verified, and files are cached per commit.
Optional endpoints (``/api/validate-yaml``, repo listing) degrade: a missing one is logged once, not fatal.
The token is passed to ``HfApi`` and the request headers only; it never appears in ``repr``, logs or errors.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, constants, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import build_hf_headers, get_session

from .base import (
    SHA_RE,
    CommitEntry,
    EndpointNotSupported,
    FileSource,
    Hub,
    HubError,
    HubUnavailable,
    RefExistsError,
    Refs,
    error_for_status,
    time_left,
    too_large,
    validate_repo_id,
)

__all__ = ["HfHub", "RETRYABLE_STATUS"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
_CHUNK = 1 << 20


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _transient(exc: BaseException) -> bool:
    """True for errors worth retrying: 429/5xx answers and connection failures."""
    if isinstance(exc, (httpx2.ConnectError, httpx2.TimeoutException, httpx2.RemoteProtocolError)):
        return True
    if isinstance(exc, HubUnavailable) and exc.__cause__ is None:
        return True  # raised by our own download for a 429/5xx answer
    return isinstance(exc, (HfHubHTTPError, httpx2.HTTPStatusError)) and _status(exc) in RETRYABLE_STATUS


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _request_url(exc: BaseException | None) -> str:
    for get in (lambda e: e.response.request.url, lambda e: e.request.url):
        try:
            return str(get(exc))
        except (AttributeError, RuntimeError):
            continue
    return ""


# Requests huggingface_hub already retries itself (http_backoff inside create_commit): retrying them again here would
# multiply the two policies, so their transient failures are final for this class.
_RETRIED_INSIDE = ("/preupload/",)


class HfHub(Hub):
    """The hub interface over ``HfApi(endpoint=..., token=...)``.

    ``namespace``: the user or organisation owning the peers' repos (default: the token's user, via
    ``/api/whoami-v2``). ``private``: visibility of the repos this hub creates (``None``: the namespace's default).
    ``max_retries``/``backoff``/``max_backoff``: bounded retry of 429/5xx, waiting ``backoff * 2**attempt`` seconds
    (capped, with jitter, or the server's ``Retry-After`` if shorter than ``max_backoff``), never past a deadline.
    ``timeout``: seconds one HTTP request may wait for the endpoint (connect and each read).
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
        timeout: float = 30.0,
    ) -> None:
        self._api = HfApi(endpoint=endpoint, token=token)
        self._token = token
        self.endpoint = self._api.endpoint
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.timeout = timeout
        self._namespace = namespace
        self.private = private
        self._warned: set[str] = set()
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

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # -- error mapping and the one retry policy ----------------------------------------------------------------

    def _call(
        self,
        what: str,
        fn: Callable[..., T],
        *args: object,
        on: tuple[str | None, str | None] = (None, None),
        **kwargs: object,
    ) -> T:
        """``fn(*args, **kwargs)`` under the retry policy; errors mapped, naming ``on`` = (repo_id, revision)."""
        repo_id, revision = on
        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except HubError as exc:
                if not _transient(exc):
                    raise
                failure: BaseException = exc
            except Exception as exc:  # mapped below; nothing is swallowed
                if not _transient(exc):
                    raise self._map(what, exc, repo_id=repo_id, revision=revision) from exc
                if any(part in _request_url(exc) for part in _RETRIED_INSIDE):
                    raise HubUnavailable(f"{what}: endpoint {self.endpoint} still failing after huggingface_hub's "
                                         f"retries ({_first_line(exc)})", repo_id=repo_id,
                                         revision=revision) from exc  # fmt: skip
                failure = exc
            delay = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)
            retry_after = getattr(getattr(failure, "response", None), "headers", {}).get("Retry-After")
            if retry_after is not None:
                try:
                    delay = min(self.max_backoff, max(0.0, float(retry_after)))
                except ValueError:
                    pass
            left = time_left()
            if attempt >= self.max_retries or (left is not None and left < delay):
                raise HubUnavailable(
                    f"{what}: endpoint {self.endpoint} still failing after {attempt + 1} attempts "
                    f"({_first_line(failure)})",
                    repo_id=repo_id,
                    revision=revision,
                ) from failure
            logger.warning("%s: transient error (%s), retry %d/%d in %.2fs", what, _first_line(failure),
                           attempt + 1, self.max_retries, delay)  # fmt: skip
            time.sleep(delay)
            attempt += 1

    def _map(self, what: str, exc: Exception, *, repo_id: str | None, revision: str | None) -> Exception:
        message = f"{what}: {_first_line(exc)}"
        if isinstance(exc, (HfHubHTTPError, httpx2.HTTPStatusError)):
            response = getattr(exc, "response", None)
            code = response.headers.get("X-Error-Code") if response is not None else None
            said = response.headers.get("X-Error-Message") if response is not None else None
            if said:
                message = f"{what}: HTTP {_status(exc)}: {said}"
            if code is None and "Entry not found" in str(exc):
                code = "EntryNotFound"
            return error_for_status(_status(exc), code, message, repo_id=repo_id, revision=revision)
        if isinstance(exc, (httpx2.HTTPError, OSError)):
            return HubUnavailable(message, repo_id=repo_id, revision=revision)
        if isinstance(exc, ValueError):  # huggingface_hub's own checks (bad answers from a non-conforming endpoint)
            return HubError(message, repo_id=repo_id, revision=revision)
        return exc

    # -- Hub interface -----------------------------------------------------------------------------------------

    def _create_repo(self, repo_id: str, *, exist_ok: bool, private: bool | None) -> None:
        private = self.private if private is None else private
        try:
            # exist_ok=False so that "already there" is an answer (409) we map, not a silent success
            self._call(f"create_repo {repo_id}", self._api.create_repo, repo_id, exist_ok=False, private=private,
                       on=(repo_id, None))  # fmt: skip
        except RefExistsError:
            if not exist_ok:
                raise RefExistsError(f"repository {repo_id!r} already exists", repo_id=repo_id) from None

    def _list_repos(self, namespace: str) -> list[str]:
        try:
            models = self._call(f"list_repos {namespace}", lambda: list(self._api.list_models(author=namespace)))
        except HubError as exc:
            if isinstance(exc, HubUnavailable) or _status(exc.__cause__) not in (404, 405, 501):
                raise
            raise EndpointNotSupported(
                f"endpoint {self.endpoint} does not list repos (optional Hub API): {exc}"
            ) from exc
        return [m.id for m in models if m.id.startswith(f"{namespace}/")]

    def _create_commit(
        self,
        repo_id: str,
        files: dict[str, FileSource],
        *,
        commit_message: str,
        parent_commit: str | None,
        revision: str,
    ) -> str:
        def commit() -> str:
            operations = [
                CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(src) if isinstance(src, Path) else src)
                for p, src in files.items()
            ]
            info = self._api.create_commit(
                repo_id, operations, commit_message=commit_message, parent_commit=parent_commit, revision=revision
            )
            return info.oid

        what = f"create_commit {repo_id}@{revision}"
        # one cheap request under this class's retry policy first: a dead or refusing endpoint answers here, within
        # seconds, instead of after huggingface_hub's own retries of the preupload call inside create_commit
        self._resolve(repo_id, revision)
        try:
            return self._call(what, commit, on=(repo_id, revision))
        except HubError as exc:
            cause = exc.__cause__
            if not (_request_url(cause).endswith("/api/validate-yaml") and _status(cause) in (404, 405, 501)):
                raise
        # validate-yaml is an optional check the client makes before a README.md commit: without it, skip it
        self._warn_once("validate-yaml", f"endpoint {self.endpoint} lacks /api/validate-yaml (optional Hub API): "
                        "README.md metadata is committed unvalidated")  # fmt: skip
        self._api._validate_yaml = lambda *args, **kwargs: None  # this client only; nothing global is patched
        return self._call(what, commit, on=(repo_id, revision))

    def _create_tag(self, repo_id: str, tag: str, sha: str, *, exist_ok: bool) -> None:
        try:
            self._call(f"create_tag {repo_id} {tag}", self._api.create_tag, repo_id, tag=tag, revision=sha,
                       on=(repo_id, tag))  # fmt: skip
        except RefExistsError:
            if not exist_ok:
                raise RefExistsError(
                    f"tag {tag!r} already exists in {repo_id!r}", repo_id=repo_id, revision=tag
                ) from None

    def _delete_tag(self, repo_id: str, tag: str) -> None:
        self._call(f"delete_tag {repo_id} {tag}", self._api.delete_tag, repo_id, tag=tag, on=(repo_id, tag))

    def _resolve(self, repo_id: str, revision: str) -> str:
        what = f"resolve {repo_id}@{revision}"
        info = self._call(what, self._api.model_info, repo_id, revision=revision, on=(repo_id, revision))
        if not info.sha or not SHA_RE.fullmatch(info.sha):
            raise HubError(f"{what}: endpoint returned no commit sha", repo_id=repo_id, revision=revision)
        return info.sha

    def _cache_root(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE) / "sorlora-gossip"

    def _download(self, repo_id: str, filename: str, *, revision: str, max_bytes: int | None) -> Path:
        sha = revision if SHA_RE.fullmatch(revision) else self._resolve(repo_id, revision)
        target = self._cache_root() / repo_id.replace("/", "--") / sha / filename
        if target.is_file():
            if max_bytes is not None and target.stat().st_size > max_bytes:
                raise too_large(repo_id, filename, sha, target.stat().st_size, max_bytes)
            return target
        what = f"download {repo_id}/{filename}@{sha}"
        self._call(what, self._fetch, repo_id, filename, sha, target, max_bytes, on=(repo_id, sha))
        return target

    def _fetch(self, repo_id: str, filename: str, sha: str, target: Path, max_bytes: int | None) -> None:
        """One streamed GET of ``filename`` at commit ``sha`` into ``target`` (size-capped, blob id verified)."""
        url = hf_hub_url(repo_id, filename, revision=sha, endpoint=self.endpoint)
        headers = build_hf_headers(token=self._token)
        target.parent.mkdir(parents=True, exist_ok=True)
        with get_session().stream("GET", url, headers=headers, timeout=self.timeout, follow_redirects=True) as answer:
            if answer.status_code >= 400:
                answer.raise_for_status()
            declared = answer.headers.get("Content-Length")
            if max_bytes is not None and declared is not None and int(declared) > max_bytes:
                raise too_large(repo_id, filename, sha, int(declared), max_bytes)  # before reading any byte
            etag = answer.headers.get("ETag", "").removeprefix("W/").strip('"')
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            try:
                received, oid = 0, None
                with os.fdopen(fd, "wb") as out:
                    for chunk in answer.iter_bytes(_CHUNK):
                        received += len(chunk)
                        if max_bytes is not None and received > max_bytes:
                            raise too_large(repo_id, filename, sha, received, max_bytes)
                        out.write(chunk)
                if declared is not None and received != int(declared):
                    raise HubUnavailable(f"download {repo_id}/{filename}@{sha}: got {received} of {declared} bytes")
                if SHA_RE.fullmatch(etag) and "X-Linked-Etag" not in answer.headers:  # a regular file: its git blob id
                    oid = hashlib.sha1(b"blob %d\0" % received)
                    with open(tmp, "rb") as done:
                        while block := done.read(_CHUNK):
                            oid.update(block)
                    if oid.hexdigest() != etag:
                        raise HubUnavailable(f"download {repo_id}/{filename}@{sha}: content does not match its ETag")
                os.chmod(tmp, 0o444)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def _tree(self, repo_id: str, revision: str) -> list[Any]:
        """The files (``RepoFile``: path, size, blob id) at ``revision``, without the Hub's ``.gitattributes``."""
        what = f"list_repo_tree {repo_id}@{revision}"
        items = self._call(what, lambda: list(self._api.list_repo_tree(repo_id, revision=revision, recursive=True)),
                           on=(repo_id, revision))  # fmt: skip
        return [i for i in items if getattr(i, "size", None) is not None and i.path != ".gitattributes"]

    def _file_sizes(self, repo_id: str, *, revision: str) -> dict[str, int]:
        return {item.path: int(item.size) for item in self._tree(repo_id, revision)}

    def _file_ids(self, repo_id: str, *, revision: str) -> dict[str, str]:
        return {item.path: str(item.blob_id) for item in self._tree(repo_id, revision)}

    def _list_commits(self, repo_id: str, *, revision: str) -> list[CommitEntry]:
        commits = self._call(f"list_commits {repo_id}@{revision}", self._api.list_repo_commits, repo_id,
                             revision=revision, on=(repo_id, revision))  # fmt: skip
        return [
            CommitEntry(
                sha=c.commit_id,
                message=c.title,
                created_at=c.created_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                authors=tuple(str(a) for a in c.authors or ()),
            )
            for c in commits
        ]

    def _list_refs(self, repo_id: str) -> Refs:
        refs = self._call(f"list_refs {repo_id}", self._api.list_repo_refs, repo_id, on=(repo_id, None))
        return Refs(
            branches={b.name: b.target_commit for b in refs.branches},
            tags={t.name: t.target_commit for t in refs.tags},
        )
