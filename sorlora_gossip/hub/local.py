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
from collections.abc import Mapping
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
    validate_path,
    validate_ref,
    validate_repo_id,
)

__all__ = ["LocalHub", "git_blob_oid"]

INITIAL_MESSAGE = "initial commit"


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
    """A hub in a local folder: no server, works offline; ``namespace`` names the peers' repos (``namespace/peer``)."""

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

    def _put_blob(self, data: bytes) -> dict[str, object]:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self._blob_path(sha256)
        if not path.exists():
            _atomic_write(path, data)
            path.chmod(0o444)
        return {"sha256": sha256, "oid": git_blob_oid(data), "size": len(data)}

    def _read_refs(self, repo_id: str) -> dict[str, dict[str, str]]:
        path = self._repo_dir(repo_id) / "refs.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise RepoNotFound(f"repository {repo_id!r} not found in {self.root}") from None

    def _write_refs(self, repo_id: str, refs: Mapping[str, Mapping[str, str]]) -> None:
        _atomic_write(self._repo_dir(repo_id) / "refs.json", json.dumps(refs, indent=1, sort_keys=True).encode())

    def _commit(self, repo_id: str, sha: str) -> dict:
        try:
            return json.loads((self._repo_dir(repo_id) / "commits" / f"{sha}.json").read_text())
        except FileNotFoundError:
            raise RevisionNotFound(f"commit {sha!r} not found in {repo_id!r}") from None

    def _write_commit(self, repo_id: str, tree: dict, parent: str | None, message: str) -> str:
        body = {"parents": [parent] if parent else [], "message": message, "created_at": _now(), "tree": tree}
        sha = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
        _atomic_write(self._repo_dir(repo_id) / "commits" / f"{sha}.json", json.dumps(dict(body, sha=sha)).encode())
        return sha

    # -- Hub interface -----------------------------------------------------------------------------------------

    def create_repo(self, repo_id: str, *, exist_ok: bool = True) -> None:
        """Create ``repo_id`` with an empty initial commit on ``main``."""
        with self._lock(repo_id):
            if (self._repo_dir(repo_id) / "refs.json").exists():
                if exist_ok:
                    return
                raise RefExistsError(f"repository {repo_id!r} already exists")
            sha = self._write_commit(repo_id, {}, None, INITIAL_MESSAGE)
            self._write_refs(repo_id, {"branches": {DEFAULT_BRANCH: sha}, "tags": {}})

    def list_repos(self, namespace: str | None = None) -> list[str]:
        """Repo ids under ``namespace`` (default: this hub's)."""
        namespace = namespace or self.namespace
        base = self.root / "repos" / validate_repo_id(f"{namespace}/x").split("/")[0]
        if not base.is_dir():
            return []
        return sorted(f"{namespace}/{d.name}" for d in base.iterdir() if (d / "refs.json").exists())

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
        validate_ref(revision)
        if not commit_message:
            raise ValueError("commit_message can't be empty")
        if parent_commit is not None and not SHA_RE.fullmatch(parent_commit):
            raise ValueError(f"parent_commit must be a 40-hex commit sha, got {parent_commit!r}")
        contents = {
            validate_path(p): (src.read_bytes() if isinstance(src, Path) else bytes(src)) for p, src in files.items()
        }
        self._read_refs(repo_id)  # RepoNotFound before writing anything
        entries = {path: self._put_blob(data) for path, data in contents.items()}  # invisible until referenced
        with self._lock(repo_id):
            refs = self._read_refs(repo_id)
            head = refs["branches"].get(revision)
            if head is None:
                raise RevisionNotFound(f"branch {revision!r} not found in {repo_id!r}")
            tree = dict(self._commit(repo_id, head)["tree"])
            if all(tree.get(path) == entry for path, entry in entries.items()):
                return head  # nothing changed: no empty commit (as on the Hub)
            if parent_commit is not None and head != parent_commit:
                raise PushConflictError(
                    f"push to {repo_id!r}@{revision} rejected: head is {head[:12]}, not parent {parent_commit[:12]}"
                )
            tree.update(entries)
            sha = self._write_commit(repo_id, tree, head, commit_message)
            refs["branches"][revision] = sha
            self._write_refs(repo_id, refs)
            return sha

    def create_tag(self, repo_id: str, tag: str, *, revision: str = DEFAULT_BRANCH, exist_ok: bool = False) -> None:
        """Point tag ``tag`` at the commit ``revision`` resolves to."""
        validate_ref(tag)
        sha = self.resolve(repo_id, revision)
        with self._lock(repo_id):
            refs = self._read_refs(repo_id)
            if tag in refs["tags"] or tag in refs["branches"]:
                if exist_ok:
                    return
                raise RefExistsError(f"tag {tag!r} already exists in {repo_id!r}")
            refs["tags"][tag] = sha
            self._write_refs(repo_id, refs)

    def resolve(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> str:
        """The commit sha of a branch, tag or full sha."""
        refs = self._read_refs(repo_id)
        if revision in refs["branches"]:
            return refs["branches"][revision]
        if revision in refs["tags"]:
            return refs["tags"][revision]
        if isinstance(revision, str) and SHA_RE.fullmatch(revision):
            self._commit(repo_id, revision)
            return revision
        raise RevisionNotFound(f"revision {revision!r} not found in {repo_id!r}")

    def tree(self, repo_id: str, *, revision: str = DEFAULT_BRANCH) -> dict[str, dict]:
        """Path -> ``{"sha256", "oid", "size"}`` of every file at ``revision`` (used by the HTTP server)."""
        return dict(self._commit(repo_id, self.resolve(repo_id, revision))["tree"])

    def download(self, repo_id: str, filename: str, *, revision: str) -> Path:
        """The content-addressed, read-only blob holding ``filename`` at ``revision``."""
        validate_path(filename)
        entry = self.tree(repo_id, revision=revision).get(filename)
        if entry is None:
            raise EntryNotFound(f"{filename!r} not found in {repo_id!r} at {revision!r}")
        return self._blob_path(entry["sha256"])

    def list_files(self, repo_id: str, *, revision: str = DEFAULT_BRANCH) -> list[str]:
        """Sorted file paths at ``revision``."""
        return sorted(self.tree(repo_id, revision=revision))

    def list_commits(self, repo_id: str, *, revision: str = DEFAULT_BRANCH) -> list[CommitEntry]:
        """First-parent history from ``revision``, newest first."""
        sha: str | None = self.resolve(repo_id, revision)
        history = []
        while sha:
            commit = self._commit(repo_id, sha)
            history.append(CommitEntry(sha=sha, message=commit["message"], created_at=commit["created_at"]))
            sha = commit["parents"][0] if commit["parents"] else None
        return history

    def list_refs(self, repo_id: str) -> Refs:
        """Branches and tags of ``repo_id``."""
        refs = self._read_refs(repo_id)
        return Refs(branches=dict(refs["branches"]), tags=dict(refs["tags"]))

    def created_at(self, repo_id: str, sha: str) -> str:
        """Creation time of commit ``sha`` (ISO 8601, UTC)."""
        return self._commit(repo_id, sha)["created_at"]
