"""Reading what other peers wrote to a hub: size-capped before the transfer, parsed without recursion, and every
failure a :class:`~peft_sorlora.PayloadError` or :class:`~sorlora_gossip.hub.HubError` naming repo, revision, reason.

The one place the peer, the CLI and the application read a hub's JSON files through (``peer.json``,
``collab.json``, member registrations, ``plan.json``).
"""

from __future__ import annotations

from peft_sorlora.exchange import PayloadError, parse_json

from .hub.base import Hub, RequestTooLarge
from .layout import INFO_FILE, MAX_INFO_BYTES, parse_peer_info

__all__ = ["MAX_JSON_BYTES", "read_json", "read_peer_info"]

MAX_JSON_BYTES = 1 << 20  # a peer.json with a long history, a collaboration's plan: far below this


def read_json(hub: Hub, repo_id: str, path: str, *, revision: str, max_bytes: int = MAX_JSON_BYTES) -> object:
    """The JSON value of ``path`` in ``repo_id`` at ``revision`` (pin a commit sha), refused when over
    ``max_bytes`` (checked before and while downloading), nested deeper than
    :data:`~peft_sorlora.exchange.MAX_JSON_DEPTH`, not UTF-8 JSON, or holding NaN/Infinity.

    Raises :class:`PayloadError` (``repo_id``/``revision`` set) for a bad file, the hub's errors (e.g.
    ``EntryNotFound``, ``RepoNotFound``) otherwise."""
    where = f"{repo_id}/{path}@{revision}"
    try:
        data = hub.read_bytes(repo_id, path, revision=revision, max_bytes=max_bytes)
    except RequestTooLarge as exc:
        raise PayloadError(f"{where}: {exc}", repo_id=repo_id, revision=revision) from exc
    try:
        return parse_json(data, max_bytes=max_bytes, what=where)
    except PayloadError as exc:
        raise PayloadError(str(exc), repo_id=repo_id, revision=revision) from exc


def read_peer_info(hub: Hub, repo_id: str, *, revision: str, round: int | None = None) -> dict:
    """The checked ``peer.json`` of ``repo_id`` at ``revision`` (:func:`~sorlora_gossip.layout.parse_peer_info`;
    ``round``: the round it must be for), refused over :data:`~sorlora_gossip.layout.MAX_INFO_BYTES` before the
    transfer.

    Raises :class:`PayloadError` for an oversized or bad file, the hub's errors (e.g. ``EntryNotFound``) otherwise."""
    try:
        data = hub.read_bytes(repo_id, INFO_FILE, revision=revision, max_bytes=MAX_INFO_BYTES)
    except RequestTooLarge as exc:
        raise PayloadError(str(exc), repo_id=repo_id, revision=revision) from exc
    return parse_peer_info(data, repo_id=repo_id, round=round)
