"""Reading what other peers wrote to a hub: size-capped before the transfer, parsed without recursion, and every
failure a :class:`~peft_sorlora.PayloadError` or :class:`~sorlora_gossip.hub.HubError` naming repo, revision, reason.

The one place the peer, the CLI and the application read a hub's JSON files through (``peer.json``,
``collab.json``, member registrations, ``plan.json``), and download a published repo's files through
(:func:`download_repo`: an adapter, an MoE, a shipped base).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from peft_sorlora.exchange import PayloadError, parse_json

from .hub.base import Hub, RequestTooLarge, validate_path
from .layout import INFO_FILE, MAX_INFO_BYTES, parse_peer_info

__all__ = ["MAX_JSON_BYTES", "MAX_REPO_FILE_BYTES", "download_repo", "read_json", "read_peer_info"]

MAX_JSON_BYTES = 1 << 20  # a peer.json with a long history, a collaboration's plan: far below this
MAX_REPO_FILE_BYTES = 8 << 30  # one file of a published repo (an adapter, an MoE's experts, a shipped base's weights)


def _read_capped(hub: Hub, repo_id: str, path: str, *, revision: str, max_bytes: int) -> bytes:
    """``path`` of ``repo_id`` at ``revision``, refused over ``max_bytes`` before and while downloading as a
    :class:`PayloadError` (the hub's message names repo, file, commit, size and limit)."""
    try:
        return hub.read_bytes(repo_id, path, revision=revision, max_bytes=max_bytes)
    except RequestTooLarge as exc:
        raise PayloadError(str(exc), repo_id=repo_id, revision=revision) from exc


def read_json(hub: Hub, repo_id: str, path: str, *, revision: str, max_bytes: int = MAX_JSON_BYTES) -> object:
    """The JSON value of ``path`` in ``repo_id`` at ``revision`` (pin a commit sha), refused when over
    ``max_bytes`` (checked before and while downloading), nested deeper than
    :data:`~peft_sorlora.exchange.MAX_JSON_DEPTH`, not UTF-8 JSON, or holding NaN/Infinity.

    Raises :class:`PayloadError` (``repo_id``/``revision`` set) for a bad file, the hub's errors (e.g.
    ``EntryNotFound``, ``RepoNotFound``) otherwise."""
    data = _read_capped(hub, repo_id, path, revision=revision, max_bytes=max_bytes)
    try:
        return parse_json(data, max_bytes=max_bytes, what=f"{repo_id}/{path}@{revision}")
    except PayloadError as exc:
        raise PayloadError(str(exc), repo_id=repo_id, revision=revision) from exc


def read_peer_info(hub: Hub, repo_id: str, *, revision: str, round: int | None = None) -> dict:
    """The checked ``peer.json`` of ``repo_id`` at ``revision`` (:func:`~sorlora_gossip.layout.parse_peer_info`;
    ``round``: the round it must be for), refused over :data:`~sorlora_gossip.layout.MAX_INFO_BYTES` before the
    transfer.

    Raises :class:`PayloadError` for an oversized or bad file, the hub's errors (e.g. ``EntryNotFound``) otherwise."""
    data = _read_capped(hub, repo_id, INFO_FILE, revision=revision, max_bytes=MAX_INFO_BYTES)
    return parse_peer_info(data, repo_id=repo_id, round=round)


def download_repo(
    hub: Hub,
    repo_id: str,
    target: Path,
    *,
    revision: str,
    suffixes: Sequence[str],
    subfolders: Sequence[str] = (),
    max_bytes: int = MAX_REPO_FILE_BYTES,
) -> Path:
    """The files of ``repo_id`` at ``revision`` (pin a commit sha, so that they are one snapshot) whose names end in
    one of ``suffixes``, written under ``target`` with their repo paths: top-level files, and those directly inside
    one of ``subfolders``. Each is refused over ``max_bytes`` before and while downloading; a path with ``..`` or a
    leading ``/`` is refused before anything is written.

    Raises :class:`PayloadError` naming repo, revision and file for an oversized file, the hub's errors otherwise."""
    paths = [validate_path(path) for path in hub.list_files(repo_id, revision=revision)]  # all, before any write
    for path in paths:
        folder, _, name = path.rpartition("/")
        if (not folder or folder in subfolders) and name.endswith(tuple(suffixes)):
            data = _read_capped(hub, repo_id, path, revision=revision, max_bytes=max_bytes)
            dest = target / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
    return target
