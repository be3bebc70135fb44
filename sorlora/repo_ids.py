"""Peers named by their full repo id ``user/name`` on any hub: a hub view whose ``repo_id`` keeps full ids as they are.

In a collaboration every member's repo lives in its own user's namespace, so a peer pulls its neighbours by full
repo id. :class:`FullIdHub` wraps any :class:`~sorlora_gossip.hub.base.Hub`: ``repo_id("bob/peer-b")`` is
``"bob/peer-b"`` (validated) and a bare name still goes to the wrapped hub's namespace; everything else is
delegated unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from sorlora_gossip.hub.base import DEFAULT_BRANCH, CommitEntry, FileSource, Hub, Refs, validate_repo_id

__all__ = ["FullIdHub", "full_id_hub"]


class FullIdHub(Hub):
    """``hub`` with full repo ids accepted by :meth:`repo_id` (see the module docstring)."""

    def __init__(self, hub: Hub) -> None:
        self.inner = hub

    def __repr__(self) -> str:
        return repr(self.inner)

    @property
    def namespace(self) -> str:  # type: ignore[override]
        return self.inner.namespace

    def repo_id(self, name: str) -> str:
        return validate_repo_id(name) if "/" in name else self.inner.repo_id(name)

    def create_repo(self, repo_id: str, *, exist_ok: bool = True) -> None:
        self.inner.create_repo(repo_id, exist_ok=exist_ok)

    def list_repos(self, namespace: str | None = None) -> list[str]:
        return self.inner.list_repos(namespace)

    def create_commit(self, repo_id: str, files: Mapping[str, FileSource], *, commit_message: str,
                      parent_commit: str | None = None, revision: str = DEFAULT_BRANCH) -> str:  # fmt: skip
        return self.inner.create_commit(repo_id, files, commit_message=commit_message, parent_commit=parent_commit,
                                        revision=revision)  # fmt: skip

    def create_tag(self, repo_id: str, tag: str, *, revision: str = DEFAULT_BRANCH, exist_ok: bool = False) -> None:
        self.inner.create_tag(repo_id, tag, revision=revision, exist_ok=exist_ok)

    def resolve(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> str:
        return self.inner.resolve(repo_id, revision)

    def download(self, repo_id: str, filename: str, *, revision: str) -> Path:
        return self.inner.download(repo_id, filename, revision=revision)

    def read_bytes(self, repo_id: str, filename: str, *, revision: str) -> bytes:
        return self.inner.read_bytes(repo_id, filename, revision=revision)

    def list_files(self, repo_id: str, *, revision: str = DEFAULT_BRANCH) -> list[str]:
        return self.inner.list_files(repo_id, revision=revision)

    def list_commits(self, repo_id: str, *, revision: str = DEFAULT_BRANCH) -> list[CommitEntry]:
        return self.inner.list_commits(repo_id, revision=revision)

    def list_refs(self, repo_id: str) -> Refs:
        return self.inner.list_refs(repo_id)


def full_id_hub(hub: Hub) -> Hub:
    """``hub`` able to name repos by full id (wrapped once)."""
    return hub if isinstance(hub, FullIdHub) else FullIdHub(hub)
