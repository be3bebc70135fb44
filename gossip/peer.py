"""A gossip peer: pushes one hub revision per round and pulls its neighbours' revisions for the same round.

Each peer owns the repo ``<namespace>/<peer_id>``. Round ``N`` is one commit holding ``update.safetensors`` (the
peft_sorlora sparse update: masks, shapes and projection seed in round 0, values only afterwards) and ``peer.json``
(peer id, round, task, cluster, bytes, SHA-256 of the payload, base model, config hash, local metrics, and which
neighbour revisions the previous pull used), tagged ``round-000N``. A pull pins each neighbour to the commit its
``round-000N`` tag names, so a round can be replayed exactly. Payloads are validated (checksum, safetensors header,
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

import torch

from peft_sorlora import PayloadError, SparseUpdate

from .hub.base import (
    DEFAULT_BRANCH,
    EntryNotFound,
    Hub,
    HubError,
    HubUnavailable,
    PushConflictError,
    RepoNotFound,
    RevisionNotFound,
)

__all__ = [
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

UPDATE_FILE = "update.safetensors"
INFO_FILE = "peer.json"
INFO_FORMAT = "sorlora-peer/1"


def round_tag(round: int) -> str:
    """The tag naming a peer's revision for ``round`` (``round-0007``)."""
    if not isinstance(round, int) or isinstance(round, bool) or round < 0:
        raise ValueError(f"round must be a non-negative integer, got {round!r}")
    return f"round-{round:04d}"


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
    """One participant of a gossip run on a :class:`~gossip.hub.base.Hub` (repo ``hub.repo_id(peer_id)``).

    ``base_model``/``config_hash`` are what neighbours' payloads must match (default: taken from this peer's own
    round-0 update, or from its last pushed ``peer.json`` when resuming). ``payload_cls`` parses pulled payloads:
    :class:`~peft_sorlora.SparseUpdate` (default) or :class:`gossip.dense.DenseUpdate` for the dense LoRA baseline.
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
            update = SparseUpdate.from_bytes(data)
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
        info = self._info(round, data, metrics)
        files = {UPDATE_FILE: data, INFO_FILE: json.dumps(info, indent=1, sort_keys=True, allow_nan=False).encode()}
        sha = self._commit(round, files, info["sha256"])
        self.hub.create_tag(self.repo_id, tag, revision=sha, exist_ok=True)
        self._head, self._last_round = sha, round
        return PushResult(round=round, sha=sha, bytes=len(data), sha256=info["sha256"], created=True)

    def _check_identity(self, update: SparseUpdate) -> None:
        for name, ours, theirs in (
            ("base model", self.base_model, update.base_model),
            ("config hash", self.config_hash, update.config_hash),
        ):
            if ours is not None and ours != theirs:
                raise ValueError(f"peer {self.peer_id!r}: update has {name} {theirs!r}, this peer uses {ours!r}")
        self.base_model = self.base_model or update.base_model
        self.config_hash = self.config_hash or update.config_hash

    def _info(self, round: int, data: bytes, metrics: Mapping[str, float] | None) -> dict:
        metrics = {str(k): float(v) for k, v in (metrics or {}).items()}
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"metrics must be finite numbers, got NaN/Inf for {bad}")
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
            "pushed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if self._last_pull is not None:
            info["previous_pull"] = self._last_pull.record()
        return info

    def _commit(self, round: int, files: dict[str, bytes], checksum: str) -> str:
        parent = self._head or self.hub.resolve(self.repo_id, DEFAULT_BRANCH)
        for attempt in range(self.max_push_attempts):
            try:
                return self.hub.create_commit(
                    self.repo_id, files, commit_message=f"{self.peer_id}: {round_tag(round)}", parent_commit=parent
                )
            except PushConflictError:
                parent = self.hub.resolve(self.repo_id, DEFAULT_BRANCH)
                logger.info("peer %s: push conflict on round %d, head moved to %s (attempt %d)", self.peer_id, round,
                            parent[:12], attempt + 1)  # fmt: skip
                try:  # our own earlier attempt may have landed (e.g. its answer was lost): do not commit twice
                    head_info = json.loads(self.hub.read_bytes(self.repo_id, INFO_FILE, revision=parent))
                    if head_info.get("round") == round and head_info.get("sha256") == checksum:
                        return parent
                except (EntryNotFound, json.JSONDecodeError, UnicodeDecodeError):
                    pass
        raise HubError(f"peer {self.peer_id!r}: round {round} not pushed after {self.max_push_attempts} conflicts")

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
