"""A gossip peer: pushes one hub revision per round and pulls its neighbours' revisions for the same round.

Each peer owns the repo ``<namespace>/<peer_id>``. Round ``N`` is one commit holding ``update.safetensors`` (the
peft_sorlora sparse update: masks, shapes and projection seed in round 0, values only afterwards), ``peer.json``
(peer id, round, task, cluster, bytes, SHA-256 of the payload, base model, config hash, local metrics, which
neighbour revisions the previous pull used, and the cumulative per-round ``history``) and, when the peer knows its
SO-LoRA config, ``README.md`` (the adapter card, see :mod:`model_cards`), tagged ``round-000N``. The card is merged
into the one at the parent revision on every push, so text users add on the hub between rounds is kept; pulls read
only ``update.safetensors`` and ``peer.json``; :meth:`Peer.publish_adapter` adds a loadable PEFT adapter, tagged.
A pull pins each neighbour to the commit its ``round-000N`` tag names, so a round can be replayed exactly. Payloads are validated (checksum, safetensors header,
finiteness, shapes, base model, config hash); a bad one is rejected with the peer and revision named, and the round
goes on without it. Nothing is unpickled: payloads are safetensors, metadata is JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors

from model_cards import AdapterCardInfo, RoundRecord, adapter_card, summarize_config, update_card
from peft_sorlora import PayloadError, SparseUpdate

from .hub.base import (
    DEFAULT_BRANCH,
    EntryNotFound,
    FileSource,
    Hub,
    HubError,
    HubUnavailable,
    PushConflictError,
    RefExistsError,
    RepoNotFound,
    RevisionNotFound,
    validate_path,
    validate_ref,
)
from .layout import CARD_FILE, INFO_FILE, INFO_FORMAT, ROUND_TAG_RE, UPDATE_FILE, round_tag

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "CARD_FILE",
    "INFO_FILE",
    "INFO_FORMAT",
    "UPDATE_FILE",
    "Peer",
    "PushResult",
    "Rejection",
    "RoundPull",
    "parse_peer_info",
    "round_tag",
]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_FILE = "adapter_config.json"  # the names PeftModel.save_pretrained writes and from_pretrained reads
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def parse_peer_info(data: bytes, *, peer_id: str, round: int | None = None) -> dict:
    """Parse and check a ``peer.json`` (JSON only): format tag, peer id, round, byte count and checksum fields."""
    try:
        info = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"{INFO_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(info, dict) or info.get("format") != INFO_FORMAT:
        raise PayloadError(f"{INFO_FILE} has format {info.get('format') if isinstance(info, dict) else None!r}, "
                           f"expected {INFO_FORMAT!r}")  # fmt: skip
    if info.get("peer_id") != peer_id:
        raise PayloadError(f"{INFO_FILE} names peer {info.get('peer_id')!r}, expected {peer_id!r}")
    if not isinstance(info.get("round"), int) or (round is not None and info["round"] != round):
        raise PayloadError(f"{INFO_FILE} is for round {info.get('round')!r}, expected {round!r}")
    if not isinstance(info.get("bytes"), int) or not isinstance(info.get("sha256"), str):
        raise PayloadError(f"{INFO_FILE} lacks the payload's byte count or sha256")
    return info


def _check_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    """``metrics`` as a str -> float dict; NaN/Inf raise (JSON and the card need finite numbers)."""
    checked = {str(k): float(v) for k, v in (metrics or {}).items()}
    bad = [k for k, v in checked.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"metrics must be finite numbers, got NaN/Inf for {bad}")
    return checked


def _json_bytes(info: Mapping[str, object]) -> bytes:
    return json.dumps(info, indent=1, sort_keys=True, allow_nan=False).encode()


def _check_history(history: object) -> list[dict]:
    """A ``peer.json`` history: a list of {round, bytes, params_transmitted, neighbours}; raise PayloadError if not."""
    if not isinstance(history, list):
        raise PayloadError(f"{INFO_FILE} history is a {type(history).__name__}, expected a list")
    for entry in history:
        ok = isinstance(entry, dict) and all(
            isinstance(entry.get(k), int) and entry[k] >= 0 for k in ("round", "bytes", "params_transmitted")
        )
        neighbours = entry.get("neighbours") if isinstance(entry, dict) else None
        if not ok or not (
            neighbours is None or (isinstance(neighbours, list) and all(isinstance(n, str) for n in neighbours))
        ):
            raise PayloadError(f"{INFO_FILE} history entry {entry!r} is malformed")
    return history


def _last_params(history: Sequence[dict]) -> int | None:
    """Parameters the peer trains: what each of its rounds transmits (the masked entries), from its last round."""
    return history[-1]["params_transmitted"] if history else None


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


@dataclass(frozen=True)
class _TreeState:
    """What a commit of this peer left in its tree: the history in ``peer.json`` and the card (if it was read)."""

    history: list[dict]
    card_text: str | None
    card_read: bool


@dataclass(frozen=True)
class PushResult:
    """What :meth:`Peer.push_round` did: the round's commit, its payload size and SHA-256, and whether it was new."""

    round: int
    sha: str
    bytes: int
    sha256: str
    created: bool


@dataclass(frozen=True)
class Rejection:
    """A neighbour payload refused during a pull, naming the peer, the revision and the reason."""

    peer: str
    revision: str | None
    reason: str

    def __str__(self) -> str:
        return f"peer {self.peer!r} revision {self.revision or '?'}: {self.reason}"


@dataclass
class RoundPull:
    """Result of :meth:`Peer.pull_round`: accepted updates (pinned revisions), skipped and rejected neighbours."""

    round: int
    updates: dict[str, SparseUpdate] = field(default_factory=dict)
    revisions: dict[str, str] = field(default_factory=dict)
    infos: dict[str, dict] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, Rejection] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when every neighbour's update was accepted."""
        return not self.skipped and not self.rejected

    def record(self) -> dict[str, object]:
        """JSON-ready summary (stored in the next push's ``peer.json`` so the hub records what each round used)."""
        return {
            "round": self.round,
            "used": dict(self.revisions),
            "skipped": dict(self.skipped),
            "rejected": {p: str(r) for p, r in self.rejected.items()},
        }


class Peer:
    """One participant of a gossip run on a :class:`~sorlora_gossip.hub.base.Hub` (repo ``hub.repo_id(peer_id)``).

    ``base_model``/``config_hash`` are what neighbours' payloads must match (default: taken from this peer's own
    round-0 update, or from its last pushed ``peer.json`` when resuming). ``payload_cls`` parses pulled payloads:
    :class:`~peft_sorlora.SparseUpdate` (default) or :class:`sorlora_gossip.dense.DenseUpdate` for the dense LoRA baseline.

    ``adapter_config`` (the peer's ``SOLoRAConfig.to_dict()``) turns on the adapter card: every push then also writes
    ``README.md``. Without it (the CLI, the dense LoRA baseline, whose LoRA config a SO-LoRA card cannot describe) no
    card is written; ``cards=False`` turns cards off even with a config. A card that cannot be made (no base model
    name, damaged markers in the hub's README) is logged and left out: it never blocks the exchange.
    """

    def __init__(
        self,
        hub: Hub,
        peer_id: str,
        *,
        task: str | None = None,
        cluster: int | str | None = None,
        base_model: str | None = None,
        config_hash: str | None = None,
        max_push_attempts: int = 8,
        payload_cls: type = SparseUpdate,
        adapter_config: Mapping[str, Any] | None = None,
        cards: bool = True,
    ) -> None:
        self.hub = hub
        self.payload_cls = payload_cls
        self.peer_id = peer_id
        self.repo_id = hub.repo_id(peer_id)
        self.task, self.cluster = task, cluster
        self.base_model, self.config_hash = base_model, config_hash
        self.max_push_attempts = max_push_attempts
        self._masks: dict[str, dict[str, torch.Tensor]] = {}
        self._head: str | None = None
        self._last_round: int | None = None
        self._synced = False
        self._last_pull: RoundPull | None = None
        self.adapter_config = None if adapter_config is None else dict(adapter_config)
        self.cards = bool(cards) and self.adapter_config is not None
        if self.cards:
            summarize_config(self.adapter_config)  # a config the card cannot show fails here, not at round 5
            if not task:
                raise ValueError(f"peer {peer_id!r}: an adapter card names the peer's task; pass task= or cards=False")
        # (commit sha, history, README text) of this peer's last commit, so a push needs no read of its own files
        self._parent_state: tuple[str, _TreeState] | None = None

    def __repr__(self) -> str:
        return f"Peer({self.peer_id!r}, hub={self.hub!r}, task={self.task!r}, cluster={self.cluster!r})"

    # -- state on the hub --------------------------------------------------------------------------------------

    def last_pushed_round(self) -> int | None:
        """The last round this peer pushed, read from the hub (None if none), for resuming after a crash.

        If a crash struck between the commit and its tag, the missing ``round-N`` tag is created here, so a
        resumed peer neither loses nor duplicates that round.
        """
        try:
            head = self.hub.resolve(self.repo_id, DEFAULT_BRANCH)
        except RepoNotFound:
            self._head, self._last_round, self._synced = None, None, True
            return None
        try:
            info = parse_peer_info(self.hub.read_bytes(self.repo_id, INFO_FILE, revision=head), peer_id=self.peer_id)
        except EntryNotFound:
            self._head, self._last_round, self._synced = head, None, True
            return None
        last = int(info["round"])
        try:
            self.hub.resolve(self.repo_id, round_tag(last))
        except RevisionNotFound:
            logger.warning("peer %s: round %d was committed but not tagged (crash?); tagging %s", self.peer_id, last,
                           head[:12])  # fmt: skip
            self.hub.create_tag(self.repo_id, round_tag(last), revision=head, exist_ok=True)
        self.base_model = self.base_model or info.get("base_model")
        self.config_hash = self.config_hash or info.get("config_hash")
        self._head, self._last_round, self._synced = head, last, True
        return last

    # -- push --------------------------------------------------------------------------------------------------

    def push_round(
        self, round: int, update: SparseUpdate | bytes, *, metrics: Mapping[str, float] | None = None
    ) -> PushResult:
        """Publish ``update`` as this peer's revision for ``round`` (one commit, tagged ``round-N``).

        ``update`` is a :class:`SparseUpdate` or its serialised bytes (validated, then pushed byte for byte).

        Rounds go in order from 0; round 0 must carry the structure (masks, seed), later rounds values only.
        Pushing a round already on the hub returns its existing commit (``created=False``): no duplicates.
        A concurrent commit to the repo (stale parent) is answered by re-reading the head and retrying.
        """
        tag = round_tag(round)
        data = bytes(update) if isinstance(update, (bytes, bytearray, memoryview)) else None
        if data is not None:
            update = self.payload_cls.from_bytes(data)
        if update.round != round:
            raise ValueError(f"update is for round {update.round}, not {round}: use get_sparse_update(..., round=N)")
        if (round == 0) != update.has_structure:
            raise ValueError(
                "round 0 must carry the masks and projection seed (include_structure=True); "
                f"later rounds carry values only (round {round}, has_structure={update.has_structure})"
            )
        self._check_identity(update)
        if not self._synced:
            self.hub.create_repo(self.repo_id, exist_ok=True)
            self.last_pushed_round()
        if self._last_round is not None and round <= self._last_round:
            sha = self.hub.resolve(self.repo_id, tag)
            info = parse_peer_info(self.hub.read_bytes(self.repo_id, INFO_FILE, revision=sha), peer_id=self.peer_id)
            return PushResult(round=round, sha=sha, bytes=int(info["bytes"]), sha256=info["sha256"], created=False)
        expected = 0 if self._last_round is None else self._last_round + 1
        if round != expected:
            raise ValueError(f"peer {self.peer_id!r}: cannot push round {round}, the next round is {expected}")
        data = data if data is not None else update.to_bytes()
        checksum = hashlib.sha256(data).hexdigest()
        metrics = _check_metrics(metrics)
        used = None if self._last_pull is None else sorted(self._last_pull.revisions)
        record = {"round": round, "bytes": len(data), "params_transmitted": int(update.num_values), "neighbours": used}

        def build(parent: str) -> tuple[dict[str, FileSource], _TreeState]:
            history, card_text = self._state_at(parent, card=self.cards)
            history = [*(h for h in history if h["round"] < round), record]
            info = self._info(round, data, metrics, history)
            files: dict[str, FileSource] = {UPDATE_FILE: data, INFO_FILE: _json_bytes(info)}
            new_card = self._card(card_text, history, metrics, params_updated=int(update.num_values))
            if new_card is not None:
                files[CARD_FILE], card_text = new_card.encode(), new_card
            return files, _TreeState(history, card_text, card_read=self.cards)

        def landed(head: str) -> bool:  # our own earlier attempt may have landed (e.g. its answer was lost)
            head_info = json.loads(self.hub.read_bytes(self.repo_id, INFO_FILE, revision=head))
            return head_info.get("round") == round and head_info.get("sha256") == checksum

        sha = self._commit(f"{self.peer_id}: {tag}", build, landed=landed)
        self.hub.create_tag(self.repo_id, tag, revision=sha, exist_ok=True)
        self._head, self._last_round = sha, round
        return PushResult(round=round, sha=sha, bytes=len(data), sha256=checksum, created=True)

    def publish_adapter(
        self,
        files: Mapping[str, bytes | Path],
        *,
        tag: str = "final",
        metrics: Mapping[str, float] | None = None,
    ) -> str:
        """Commit a loadable PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``, as written by
        ``PeftModel.save_pretrained``) with the adapter card, tag the commit ``tag`` and return its sha.

        The card's snippet then loads it (``PeftModel.from_pretrained(base, repo_id, revision=tag)``); a
        ``peft.save_as_lora`` export gets the plain-LoRA card. ``metrics`` default to the last pushed round's.
        """
        validate_ref(tag)
        if ROUND_TAG_RE.fullmatch(tag):
            raise ValueError(f"tag {tag!r} looks like a round tag; pick another name (e.g. 'final')")
        payload = _adapter_files(files)
        adapter_config = json.loads(_read(payload[ADAPTER_CONFIG_FILE]))
        lora_export = adapter_config.get("peft_type") == "LORA"
        config = self.adapter_config if lora_export else adapter_config
        if config is None:
            raise ValueError(f"peer {self.peer_id!r}: the card of a LoRA export shows the SO-LoRA config the peer was "
                             "built with; pass adapter_config= to Peer")  # fmt: skip
        if not self.task:
            raise ValueError(f"peer {self.peer_id!r}: the adapter card names the peer's task; set Peer(task=...)")
        base_model = self.base_model or adapter_config.get("base_model_name_or_path")
        if not base_model:
            raise ValueError(f"peer {self.peer_id!r}: no base model to name in the card (Peer(base_model=...))")
        if not self._synced:
            self.hub.create_repo(self.repo_id, exist_ok=True)
            self.last_pushed_round()
        try:
            self.hub.resolve(self.repo_id, tag)
        except RevisionNotFound:
            pass
        else:
            raise RefExistsError(f"peer {self.peer_id!r}: tag {tag!r} already exists in {self.repo_id}")

        def build(parent: str) -> tuple[dict[str, FileSource], _TreeState]:
            history, existing = self._state_at(parent, card=True)
            shown = _check_metrics(metrics) if metrics is not None else self._metrics_at(parent)
            info = self._card_info(history, shown, params_updated=_last_params(history), config=config,
                                   base_model=base_model, revision=tag)  # fmt: skip
            card_text = update_card(existing, adapter_card(info, lora_export=lora_export))
            return {**payload, CARD_FILE: card_text.encode()}, _TreeState(history, card_text, card_read=True)

        sha = self._commit(f"{self.peer_id}: adapter ({tag})", build)
        self.hub.create_tag(self.repo_id, tag, revision=sha, exist_ok=False)
        self._head = sha
        return sha

    def _check_identity(self, update: SparseUpdate) -> None:
        for name, ours, theirs in (
            ("base model", self.base_model, update.base_model),
            ("config hash", self.config_hash, update.config_hash),
        ):
            if ours is not None and ours != theirs:
                raise ValueError(f"peer {self.peer_id!r}: update has {name} {theirs!r}, this peer uses {ours!r}")
        self.base_model = self.base_model or update.base_model
        self.config_hash = self.config_hash or update.config_hash

    def _info(self, round: int, data: bytes, metrics: dict[str, float], history: list[dict]) -> dict:
        info: dict[str, object] = {
            "format": INFO_FORMAT,
            "peer_id": self.peer_id,
            "round": round,
            "task": self.task,
            "cluster": self.cluster,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "base_model": self.base_model,
            "config_hash": self.config_hash,
            "metrics": metrics,
            "history": history,
            "pushed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if self._last_pull is not None:
            info["previous_pull"] = self._last_pull.record()
        return info

    def _commit(
        self,
        message: str,
        build: Callable[[str], tuple[dict[str, FileSource], _TreeState]],
        *,
        landed: Callable[[str], bool] | None = None,
    ) -> str:
        """Commit ``build(parent)``'s files on top of ``parent``; when the head moved (someone edited the card on the
        hub, another writer), rebuild them on the new head, so what is merged from the parent is never stale."""
        parent = self._head or self.hub.resolve(self.repo_id, DEFAULT_BRANCH)
        for attempt in range(self.max_push_attempts):
            files, state = build(parent)
            try:
                sha = self.hub.create_commit(self.repo_id, files, commit_message=message, parent_commit=parent)
            except PushConflictError:
                parent = self.hub.resolve(self.repo_id, DEFAULT_BRANCH)
                logger.info("peer %s: push conflict on %r, head moved to %s (attempt %d)", self.peer_id, message,
                            parent[:12], attempt + 1)  # fmt: skip
                try:  # do not commit twice
                    if landed is not None and landed(parent):
                        self._parent_state = None
                        return parent
                except (EntryNotFound, json.JSONDecodeError, UnicodeDecodeError):
                    pass
                continue
            self._parent_state = (sha, state)
            return sha
        raise HubError(f"peer {self.peer_id!r}: {message!r} not pushed after {self.max_push_attempts} conflicts")

    # -- the card ----------------------------------------------------------------------------------------------

    def _info_at(self, revision: str) -> dict | None:
        """This peer's ``peer.json`` at ``revision`` (None before its first round)."""
        try:
            return parse_peer_info(
                self.hub.read_bytes(self.repo_id, INFO_FILE, revision=revision), peer_id=self.peer_id
            )
        except EntryNotFound:
            return None

    def _state_at(self, revision: str, *, card: bool) -> tuple[list[dict], str | None]:
        """History (from ``peer.json``) and, when ``card``, the card text (``README.md``) of this repo at ``revision``."""
        if self._parent_state is not None and self._parent_state[0] == revision:
            state = self._parent_state[1]
            if state.card_read or not card:
                return list(state.history), state.card_text
        history: list[dict] = []
        try:
            info = self._info_at(revision)
            history = [] if info is None else _check_history(info.get("history", []))
        except PayloadError as exc:  # our own history is unreadable: start a new one rather than stop the exchange
            logger.warning("peer %s: %s at %s unusable, history restarts: %s", self.peer_id, INFO_FILE, revision[:12],
                           exc)  # fmt: skip
        card_text = None
        if card:
            try:
                card_text = self.hub.read_bytes(self.repo_id, CARD_FILE, revision=revision).decode("utf-8-sig")
            except EntryNotFound:
                pass
        return history, card_text

    def _metrics_at(self, revision: str) -> dict[str, float]:
        """The metrics of this peer's last round at ``revision`` (none before its first round)."""
        info = self._info_at(revision)
        return _check_metrics(info.get("metrics") if info is not None else None)

    def _card_info(
        self,
        history: list[dict],
        metrics: Mapping[str, float],
        *,
        params_updated: int | None,
        config: Mapping[str, Any] | None = None,
        base_model: str | None = None,
        revision: str | None = None,
    ) -> AdapterCardInfo:
        neighbours = next((h["neighbours"] for h in reversed(history) if h.get("neighbours") is not None), [])
        return AdapterCardInfo(
            repo_id=self.repo_id,
            base_model=base_model or self.base_model or "",
            peer_id=self.peer_id,
            task=self.task or "",
            config=config if config is not None else self.adapter_config or {},
            cluster=self.cluster,
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

    def _card(
        self, existing: str | None, history: list[dict], metrics: Mapping[str, float], *, params_updated: int
    ) -> str | None:
        """The round's card merged into ``existing`` (user text kept); None when cards are off or it cannot be made."""
        if not self.cards:
            return None
        try:
            card = adapter_card(self._card_info(history, metrics, params_updated=params_updated))
            return update_card(existing, card)
        except ValueError as exc:
            logger.warning("peer %s: README.md not updated this round: %s", self.peer_id, exc)
            return None

    # -- pull --------------------------------------------------------------------------------------------------

    def pull_round(
        self,
        round: int,
        neighbours: Sequence[str],
        *,
        timeout: float = 60.0,
        poll_interval: float = 0.2,
        progress: Callable[[str, int], None] | None = None,
    ) -> RoundPull:
        """Fetch each neighbour's ``round-N`` revision, waiting up to ``timeout`` seconds for late ones.

        Returns the validated updates with the commit each was pinned to; neighbours still missing at the timeout
        are listed in ``skipped`` and bad payloads in ``rejected`` (with reasons). ``progress(peer, nbytes)`` is
        called after each neighbour's payload is fetched.
        """
        tag = round_tag(round)
        result = RoundPull(round=round)
        pending = [n for n in dict.fromkeys(neighbours) if n != self.peer_id]
        repos = {n: self.hub.repo_id(n) for n in pending}
        last_error: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while True:
            for peer in list(pending):
                try:
                    sha = self.hub.resolve(repos[peer], tag)
                except (RepoNotFound, RevisionNotFound) as exc:
                    last_error[peer] = f"no {tag} yet ({type(exc).__name__})"
                    continue
                except HubUnavailable as exc:
                    last_error[peer] = str(exc)
                    continue
                pending.remove(peer)
                self._fetch(peer, repos[peer], round, sha, result)
                if progress is not None and peer in result.bytes:
                    progress(peer, result.bytes[peer])
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))
        for peer in pending:
            result.skipped[peer] = f"{tag} not pushed within {timeout:g}s ({last_error.get(peer, 'no answer')})"
            logger.warning("peer %s: skipping neighbour %s in round %d: %s", self.peer_id, peer, round,
                           result.skipped[peer])  # fmt: skip
        self._last_pull = result
        return result

    def _fetch(self, peer: str, repo_id: str, round: int, sha: str, result: RoundPull) -> None:
        try:
            update, info, nbytes = self._load(peer, repo_id, round, sha)
        except (PayloadError, HubError) as exc:
            rejection = Rejection(peer=peer, revision=sha, reason=str(exc))
            result.rejected[peer] = rejection
            logger.warning("peer %s: rejected %s", self.peer_id, rejection)
            return
        result.updates[peer], result.infos[peer] = update, info
        result.revisions[peer], result.bytes[peer] = sha, nbytes

    def _load(self, peer: str, repo_id: str, round: int, sha: str) -> tuple[SparseUpdate, dict, int]:
        try:
            info = parse_peer_info(self.hub.read_bytes(repo_id, INFO_FILE, revision=sha), peer_id=peer, round=round)
            data = self.hub.read_bytes(repo_id, UPDATE_FILE, revision=sha)
        except EntryNotFound as exc:
            raise PayloadError(f"revision lacks {UPDATE_FILE} or {INFO_FILE}: {exc}") from exc
        if len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise PayloadError(
                f"{UPDATE_FILE} does not match {INFO_FILE} ({len(data)} bytes vs {info['bytes']}, checksum differs): "
                "corrupted or truncated"
            )
        masks = None if round == 0 else self._neighbour_masks(peer, repo_id)
        update = self.payload_cls.from_bytes(
            data, expected_base_model=self.base_model, expected_config_hash=self.config_hash, masks=masks
        )
        if update.round != round:
            raise PayloadError(f"payload header says round {update.round}, the tag says {round}")
        if (round == 0) != update.has_structure:
            raise PayloadError(f"round {round} payload has_structure={update.has_structure}: wrong kind of payload")
        if round == 0:
            self._masks[peer] = update.masks
        return update, info, len(data)

    def _neighbour_masks(self, peer: str, repo_id: str) -> dict[str, torch.Tensor]:
        """The masks from ``peer``'s round-0 payload (fetched at its ``round-0000`` tag if not seen yet)."""
        if peer not in self._masks:
            sha = self.hub.resolve(repo_id, round_tag(0))
            try:
                self._load(peer, repo_id, 0, sha)
            except PayloadError as exc:
                raise PayloadError(f"its round-0 structure (revision {sha}) is unusable: {exc}") from exc
        return self._masks[peer]
