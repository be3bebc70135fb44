"""What a peer publishes on top of the exchange: the adapter card on every round and the final PEFT adapter.

:class:`~sorlora_gossip.Peer` builds each round's commit (``update.safetensors``, ``peer.json``) and asks its
:class:`RoundHook` for any further files; :class:`AdapterCards` is the hook that writes ``README.md``, the adapter card
(:mod:`model_cards`), merged into the one at the parent revision so text users add on the hub is kept: pass it as
``Peer(..., hook=AdapterCards(config, task=...))``. The final adapter is published with :func:`publish_adapter`
through :meth:`Peer.commit_files`. This module is built on :mod:`sorlora_gossip.peer`, which never imports it. A
card never blocks the exchange: one that cannot be made is logged and left out.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors

from model_cards import AdapterCardInfo, RoundRecord, adapter_card, summarize_config, update_card

from .hub.base import (
    EntryNotFound,
    FileSource,
    HubError,
    RefExistsError,
    RepoNotFound,
    RevisionNotFound,
    validate_path,
    validate_ref,
)
from .layout import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, CARD_FILE, FINAL_TAG, ROUND_TAG_RE, check_metrics
from .peer import Peer, RoundHook

__all__ = ["AdapterCards", "RoundHook", "card_info", "publish_adapter"]

logger = logging.getLogger(__name__)


def _last_params(history: Sequence[dict]) -> int | None:
    """Parameters the peer trains: what each of its rounds transmits (the masked entries), from its last round."""
    return history[-1]["params_transmitted"] if history else None


def card_info(
    peer: Peer,
    history: list[dict],
    metrics: Mapping[str, float],
    *,
    params_updated: int | None,
    config: Mapping[str, Any],
    base_model: str | None = None,
    revision: str | None = None,
) -> AdapterCardInfo:
    """What the adapter card of ``peer`` shows, from its ``peer.json`` history and metrics."""
    neighbours = next((h["neighbours"] for h in reversed(history) if h.get("neighbours") is not None), [])
    return AdapterCardInfo(
        repo_id=peer.repo_id,
        base_model=base_model or peer.base_model or "",
        peer_id=peer.peer_id,
        task=peer.task or "",
        config=config,
        cluster=peer.cluster,
        neighbours=list(neighbours),
        rounds=[
            RoundRecord(
                round=h["round"],
                params_transmitted=h["params_transmitted"],
                bytes_sent=h["bytes"],
                neighbours=None if h.get("neighbours") is None else len(h["neighbours"]),
            )
            for h in history
        ],
        params_updated=params_updated,
        metrics=metrics,
        revision=revision,
    )


def _card_text(peer: Peer, revision: str, cache: tuple[str, str | None] | None) -> str | None:
    """The card at ``revision`` of ``peer``'s repo (the cached text when it is the commit last written)."""
    if cache is not None and cache[0] == revision:
        return cache[1]
    try:
        return peer.hub.read_bytes(peer.repo_id, CARD_FILE, revision=revision, max_bytes=1 << 20).decode("utf-8-sig")
    except EntryNotFound:
        return None


class AdapterCards(RoundHook):
    """The adapter card hook: every round writes ``README.md`` for ``adapter_config`` (a ``SOLoRAConfig.to_dict()``),
    merged into the parent's card. The config and ``task`` are checked when the hook is made, not at round 5."""

    def __init__(self, adapter_config: Mapping[str, Any], *, task: str | None, peer_id: str = "") -> None:
        self.adapter_config = dict(adapter_config)
        summarize_config(self.adapter_config)
        if not task:
            raise ValueError(f"peer {peer_id!r}: an adapter card names the peer's task; pass task= or cards=False")
        self._pending: str | None = None
        self._written: tuple[str, str | None] | None = None  # (commit sha, card text) last committed

    def round_files(
        self, peer: Peer, *, parent: str, history: list[dict], metrics: Mapping[str, float], params_updated: int
    ) -> dict[str, bytes]:
        """The round's card merged into the parent's (user text kept); nothing when it cannot be made."""
        self._pending = None
        try:
            existing = _card_text(peer, parent, self._written)
            info = card_info(peer, history, metrics, params_updated=params_updated, config=self.adapter_config)
            self._pending = update_card(existing, adapter_card(info))
        except (ValueError, HubError) as exc:  # never block the exchange (UnicodeDecodeError is a ValueError)
            logger.warning("peer %s: %s not updated this round: %s", peer.peer_id, CARD_FILE, exc)
            return {}
        return {CARD_FILE: self._pending.encode()}

    def committed(self, sha: str) -> None:
        """Remember the card just committed, so the next round merges into it without reading it back."""
        if self._pending is not None:
            self._written, self._pending = (sha, self._pending), None


def _read(source: FileSource) -> bytes:
    return source.read_bytes() if isinstance(source, Path) else bytes(source)


def _adapter_files(files: Mapping[str, bytes | Path]) -> dict[str, FileSource]:
    """Check the files of a PEFT adapter (config JSON, safetensors weights) and return them path -> bytes/Path."""
    checked: dict[str, FileSource] = {}
    for name, source in files.items():
        validate_path(name)
        if name == CARD_FILE:
            raise ValueError(f"{CARD_FILE} is generated by publish_adapter; edit it on the hub instead (it is kept)")
        if not isinstance(source, (bytes, bytearray, Path)):
            raise ValueError(f"file {name!r} must be bytes or a pathlib.Path, got {type(source).__name__}")
        if isinstance(source, Path) and not source.is_file():
            raise ValueError(f"file {name!r}: {source} is not a file")
        checked[name] = bytes(source) if isinstance(source, bytearray) else source
    missing = [name for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE) if name not in checked]
    if missing:
        raise ValueError(f"an adapter needs {missing} (as PeftModel.save_pretrained writes them)")
    try:
        config = json.loads(_read(checked[ADAPTER_CONFIG_FILE]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{ADAPTER_CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("peft_type") not in ("SOLORA", "LORA"):
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise ValueError(f"{ADAPTER_CONFIG_FILE} is for peft_type {kind!r}, expected 'SOLORA' (or a 'LORA' export)")
    weights = checked[ADAPTER_WEIGHTS_FILE]
    try:
        if isinstance(weights, Path):
            with safe_open(str(weights), framework="pt"):
                pass
        else:
            load_safetensors(weights)
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise ValueError(f"{ADAPTER_WEIGHTS_FILE} is not a valid safetensors file: {exc}") from exc
    return checked


def publish_adapter(
    peer: Peer,
    files: Mapping[str, bytes | Path],
    *,
    tag: str = FINAL_TAG,
    metrics: Mapping[str, float] | None = None,
    config: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    card: Mapping[str, Any] | None = None,
) -> str:
    """Commit a loadable PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``, as written by
    ``PeftModel.save_pretrained``) to ``peer``'s repo with the adapter card, tag the commit ``tag``, return its sha.

    The card's snippet then loads it (``PeftModel.from_pretrained(base, repo_id, revision=tag)``); a
    ``peft.save_as_lora`` export gets the plain-LoRA card, which shows ``config``, the SO-LoRA config the peer was
    built with (default: that of the peer's :class:`AdapterCards` hook). ``metrics`` default to the last pushed
    round's. ``base_model``: the base the card names (default: the peer's); ``card``: further
    :class:`~model_cards.AdapterCardInfo` fields (the collaboration's MoE, the base's fingerprint, ...).
    """
    validate_ref(tag)
    if ROUND_TAG_RE.fullmatch(tag):
        raise ValueError(f"tag {tag!r} looks like a round tag; pick another name (e.g. 'final')")
    payload = _adapter_files(files)
    adapter_config = json.loads(_read(payload[ADAPTER_CONFIG_FILE]))
    lora_export = adapter_config.get("peft_type") == "LORA"
    if config is None:
        config = getattr(peer.hook, "adapter_config", None)
    config = config if lora_export else adapter_config
    if config is None:
        raise ValueError(f"peer {peer.peer_id!r}: the card of a LoRA export shows the SO-LoRA config the peer was "
                         "built with; pass config= or give the Peer an AdapterCards hook")  # fmt: skip
    if not peer.task:
        raise ValueError(f"peer {peer.peer_id!r}: the adapter card names the peer's task; set Peer(task=...)")
    base_model = base_model or peer.base_model or adapter_config.get("base_model_name_or_path")
    if not base_model:
        raise ValueError(f"peer {peer.peer_id!r}: no base model to name in the card (Peer(base_model=...))")
    try:
        peer.hub.resolve(peer.repo_id, tag)
    except (RevisionNotFound, RepoNotFound):  # no such tag (or no repo yet: commit_files creates it)
        pass
    else:
        raise RefExistsError(f"peer {peer.peer_id!r}: tag {tag!r} already exists in {peer.repo_id}")

    def build(parent: str) -> dict[str, FileSource]:
        history = peer.history_at(parent)
        shown = check_metrics(metrics) if metrics is not None else peer.metrics_at(parent)
        info = card_info(peer, history, shown, params_updated=_last_params(history), config=config,
                         base_model=base_model, revision=tag)  # fmt: skip
        if card:
            info = dataclasses.replace(info, **card)
        existing = _card_text(peer, parent, None)
        card_text = update_card(existing, adapter_card(info, lora_export=lora_export))
        return {**payload, CARD_FILE: card_text.encode()}

    sha = peer.commit_files(f"{peer.peer_id}: adapter ({tag})", build)
    peer.hub.create_tag(peer.repo_id, tag, revision=sha, exist_ok=False)
    return sha
