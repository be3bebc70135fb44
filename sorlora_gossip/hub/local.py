"""LocalHub: the embedded hub, a folder with content-addressed blobs, immutable commits and atomically updated refs.

Layout under ``root``::

    blobs/<aa>/<sha256>               file contents, named by their SHA-256 (read-only once written)
    repos/<ns>/<name>/commits/<sha>.json   immutable commit objects (tree, parent, message, time)
    repos/<ns>/<name>/refs.json       {"branches": {...}, "tags": {...}}, replaced atomically
    locks/<ns>/<name>.lock            filelock serialising ref updates across threads and processes

Every file is written to a temporary name and moved into place with ``os.replace``; a commit becomes visible only
when ``refs.json`` names it, so a crash mid-push leaves at most unreferenced objects behind. Works offline and on a
shared filesystem (several processes may share one root).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock

from .base import (
    DEFAULT_BRANCH,
    SHA_RE,
    CommitEntry,
    EntryNotFound,
    FileSource,
    Hub,
    PushConflictError,
    RefExistsError,
    Refs,
    RepoNotFound,
    RevisionNotFound,
    check_tree,
    too_large,
    validate_repo_id,
)

__all__ = ["LocalHub", "git_blob_oid"]

INITIAL_MESSAGE = "initial commit"
_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)
# A check run on the head tree under the repo lock just before a commit lands (see LocalHub.commit_check)
_COMMIT_CHECK: ContextVar[Callable[[dict[str, dict]], None] | None] = ContextVar("local_commit_check", default=None)
# The user a commit is recorded as written by (see LocalHub.commit_author)
_COMMIT_AUTHOR: ContextVar[str | None] = ContextVar("local_commit_author", default=None)


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of ``data`` (what ``git hash-object`` prints; the Hub's ETag for a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalHub(Hub):
    """A hub in a local folder: no server, works offline; ``namespace`` names the peers' repos (``namespace/peer``).

    Files are streamed into content-addressed blobs (never held whole in memory; runs of zeros stay sparse)."""

    def __init__(self, root: str | os.PathLike[str], *, namespace: str = "gossip", lock_timeout: float = 60.0) -> None:
        self.root = Path(root).resolve()
        self.namespace = namespace
        self.lock_timeout = lock_timeout
        self.root.mkdir(parents=True, exist_ok=True)
        validate_repo_id(f"{namespace}/x")

    def __repr__(self) -> str:
        return f"LocalHub({str(self.root)!r}, namespace={self.namespace!r})"

    # -- paths and low-level objects ---------------------------------------------------------------------------

    def _repo_dir(self, repo_id: str) -> Path:
        return self.root / "repos" / validate_repo_id(repo_id)

    def _lock(self, repo_id: str) -> FileLock:
        path = self.root / "locks" / f"{validate_repo_id(repo_id)}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path), timeout=self.lock_timeout)

    def _blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def _put_blob(self, source: FileSource) -> dict[str, object]:
        """Stream ``source`` into a blob (hashing as it goes); zero runs are skipped with seeks, so stay sparse."""
        size = source.stat().st_size if isinstance(source, Path) else len(source)
        sha256, oid = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
        folder = self.root / "blobs" / "tmp"
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(source, Path):
                    with source.open("rb") as src:
                        written = 0
                        while chunk := src.read(_CHUNK):
                            sha256.update(chunk)
                            oid.update(chunk)
                            if chunk == _ZEROS[: len(chunk)]:
                                out.seek(len(chunk), os.SEEK_CUR)
                            else:
                                out.write(chunk)
                            written += len(chunk)
                        if written != size:
                            raise OSError(f"{source.name} changed size while being committed")
                        out.truncate(written)
                else:
                    sha256.update(source)
                    oid.update(source)
                    out.write(source)
                out.flush()
                os.fsync(out.fileno())
            path = self._blob_path(sha256.hexdigest())
            if path.exists():
                Path(tmp).unlink()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(tmp, 0o444)
                os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return {"sha256": sha256.hexdigest(), "oid": oid.hexdigest(), "size": size}

    def _read_refs(self, repo_id: str) -> dict:
        path = self._repo_dir(repo_id) / "refs.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise RepoNotFound(f"repository {repo_id!r} not found", repo_id=repo_id) from None

    def _write_refs(self, repo_id: str, refs: Mapping[str, object]) -> None:
        _atomic_write(self._repo_dir(repo_id) / "refs.json", json.dumps(refs, indent=1, sort_keys=True).encode())

    def _commit(self, repo_id: str, sha: str) -> dict:
        try:
            return json.loads((self._repo_dir(repo_id) / "commits" / f"{sha}.json").read_text())
        except FileNotFoundError:
            raise RevisionNotFound(f"commit {sha!r} not found in {repo_id!r}", repo_id=repo_id, revision=sha) from None

    def _write_commit(self, repo_id: str, tree: dict, parent: str | None, message: str) -> str:
        body = {"parents": [parent] if parent else [], "message": message, "created_at": _now(), "tree": tree}
        author = _COMMIT_AUTHOR.get()
        if author is not None:
            body["authors"] = [author]
        sha = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
        _atomic_write(self._repo_dir(repo_id) / "commits" / f"{sha}.json", json.dumps(dict(body, sha=sha)).encode())
        return sha

    # -- Hub interface -----------------------------------------------------------------------------------------

    def _create_repo(self, repo_id: str, *, exist_ok: bool, private: bool | None) -> None:
        with self._lock(repo_id):
            if (self._repo_dir(repo_id) / "refs.json").exists():
                if exist_ok:
                    return
                raise RefExistsError(f"repository {repo_id!r} already exists", repo_id=repo_id)
            sha = self._write_commit(repo_id, {}, None, INITIAL_MESSAGE)
            self._write_refs(repo_id, {"branches": {DEFAULT_BRANCH: sha}, "tags": {}, "private": bool(private)})

    def is_private(self, repo_id: str) -> bool:
        """Whether ``repo_id`` was created private (readable by its owner only, where a server enforces it)."""
        return bool(self._read_refs(repo_id).get("private", False))

    def _list_repos(self, namespace: str) -> list[str]:
        base = self.root / "repos" / namespace
        if not base.is_dir():
            return []
        return [f"{namespace}/{d.name}" for d in base.iterdir() if (d / "refs.json").exists()]

    @contextmanager
    def commit_check(self, check: Callable[[dict[str, dict]], None]) -> Iterator[None]:
        """Within this block (this thread), run ``check(head_tree)`` under the repo lock before each commit lands;
        what it raises refuses the commit (``hub-serve`` uses it for write-once files such as ``plan.json``)."""
        token = _COMMIT_CHECK.set(check)
        try:
            yield
        finally:
            _COMMIT_CHECK.reset(token)

    @contextmanager
    def commit_author(self, user: str) -> Iterator[None]:
        """Within this block (this thread), commits are recorded as authored by ``user`` (``hub-serve`` passes the
        user its token authenticated, as the Hub records a commit's authors); outside, commits have no author."""
        token = _COMMIT_AUTHOR.set(user)
        try:
            yield
        finally:
            _COMMIT_AUTHOR.reset(token)

    def _create_commit(
        self,
        repo_id: str,
        files: dict[str, FileSource],
        *,
        commit_message: str,
        parent_commit: str | None,
        revision: str,
    ) -> str:
        self._read_refs(repo_id)  # RepoNotFound before writing anything
        entries = {path: self._put_blob(source) for path, source in files.items()}  # invisible until referenced
        with self._lock(repo_id):
            refs = self._read_refs(repo_id)
            head = refs["branches"].get(revision)
            if head is None:
                raise RevisionNotFound(f"branch {revision!r} not found in {repo_id!r}", repo_id=repo_id,
                                       revision=revision)  # fmt: skip
            tree = dict(self._commit(repo_id, head)["tree"])
            if all(tree.get(path) == entry for path, entry in entries.items()):
                return head  # nothing changed: no empty commit (as on the Hub)
            if parent_commit is not None and head != parent_commit:
                raise PushConflictError(
                    f"push to {repo_id!r}@{revision} rejected: head is {head[:12]}, not parent {parent_commit[:12]}",
                    repo_id=repo_id,
                    revision=revision,
                )
            check = _COMMIT_CHECK.get()
            if check is not None:
                check(tree)
            tree.update(entries)
            check_tree(tree)
            sha = self._write_commit(repo_id, tree, head, commit_message)
            refs["branches"][revision] = sha
            self._write_refs(repo_id, refs)
            return sha

    def _create_tag(self, repo_id: str, tag: str, sha: str, *, exist_ok: bool) -> None:
        with self._lock(repo_id):
            refs = self._read_refs(repo_id)
            if tag in refs["tags"] or tag in refs["branches"]:
                if exist_ok:
                    return
                raise RefExistsError(f"tag {tag!r} already exists in {repo_id!r}", repo_id=repo_id, revision=tag)
            refs["tags"][tag] = sha
            self._write_refs(repo_id, refs)

    def _delete_tag(self, repo_id: str, tag: str) -> None:
        with self._lock(repo_id):
            refs = self._read_refs(repo_id)
            if tag not in refs["tags"]:
                raise RevisionNotFound(f"tag {tag!r} not found in {repo_id!r}", repo_id=repo_id, revision=tag)
            del refs["tags"][tag]
            self._write_refs(repo_id, refs)

    def _resolve(self, repo_id: str, revision: str) -> str:
        refs = self._read_refs(repo_id)
        if SHA_RE.fullmatch(revision):  # a full sha is a commit, whatever refs exist
            self._commit(repo_id, revision)
            return revision
        if revision in refs["branches"]:
            return refs["branches"][revision]
        if revision in refs["tags"]:
            return refs["tags"][revision]
        raise RevisionNotFound(f"revision {revision!r} not found in {repo_id!r}", repo_id=repo_id, revision=revision)

    def tree(self, repo_id: str, *, revision: str = DEFAULT_BRANCH) -> dict[str, dict]:
        """Path -> ``{"sha256", "oid", "size"}`` of every file at ``revision`` (used by the HTTP server)."""
        return dict(self._commit(repo_id, self.resolve(repo_id, revision))["tree"])

    def _download(self, repo_id: str, filename: str, *, revision: str, max_bytes: int | None) -> Path:
        entry = self.tree(repo_id, revision=revision).get(filename)
        if entry is None:
            raise EntryNotFound(f"{filename!r} not found in {repo_id!r} at {revision!r}", repo_id=repo_id,
                                revision=revision)  # fmt: skip
        if max_bytes is not None and entry["size"] > max_bytes:
            raise too_large(repo_id, filename, revision, entry["size"], max_bytes)
        return self._blob_path(entry["sha256"])

    def _file_sizes(self, repo_id: str, *, revision: str) -> dict[str, int]:
        return {path: int(entry["size"]) for path, entry in self.tree(repo_id, revision=revision).items()}

    def _file_ids(self, repo_id: str, *, revision: str) -> dict[str, str]:
        return {path: str(entry["oid"]) for path, entry in self.tree(repo_id, revision=revision).items()}

    def _list_commits(self, repo_id: str, *, revision: str) -> list[CommitEntry]:
        sha: str | None = self._resolve(repo_id, revision)
        history = []
        while sha:
            commit = self._commit(repo_id, sha)
            history.append(CommitEntry(sha=sha, message=commit["message"], created_at=commit["created_at"],
                                       authors=tuple(commit.get("authors", ()))))  # fmt: skip
            sha = commit["parents"][0] if commit["parents"] else None
        return history

    def _list_refs(self, repo_id: str) -> Refs:
        refs = self._read_refs(repo_id)
        return Refs(branches=dict(refs["branches"]), tags=dict(refs["tags"]))

    def created_at(self, repo_id: str, sha: str) -> str:
        """Creation time of commit ``sha`` (ISO 8601, UTC)."""
        return self._commit(repo_id, sha)["created_at"]
