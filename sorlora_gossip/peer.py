"""A gossip peer: the push/pull protocol. It pushes one hub revision per round and pulls its neighbours' revisions
for the same round; the on-hub layout and ``peer.json`` schema live in :mod:`sorlora_gossip.layout`, what is built on
top (the adapter card, the final adapter) in :mod:`sorlora_gossip.cards`, which imports this module and plugs in
through a :class:`RoundHook` (the peer knows nothing of cards).

Each peer owns the repo ``hub.repo_id(peer_id)`` (``namespace/peer_id``, or ``peer_id`` itself when it is a full repo
id). Round ``N`` is one commit holding ``update.safetensors`` (a :class:`~sorlora_gossip.payload.Payload`: SO-LoRA's
masks, shapes and projection seed in round 0, values only afterwards, or a dense LoRA state), ``peer.json`` (peer id,
round, task, cluster, bytes, SHA-256 of the payload, base model, config hash, local metrics, which neighbour
revisions the previous pull used, and the cumulative per-round ``history``) and the hook's files, tagged
``round-000N``. A second live writer of one peer id is refused (:class:`SecondWriterError`); a squatted round tag is
replaced.

A pull trusts nothing: a neighbour's round is the first commit on its main history whose ``peer.json`` says that
round, whatever its tag names (a tag moved to a later commit with another payload is an equivocation: that revision
is rejected and recorded, :attr:`RoundPull.equivocations`, so every neighbour uses the same round-r commit), and the
revision is pinned by its sha, so a round can be replayed exactly; sizes are checked before
downloading (a values-only payload's exactly, from the neighbour's round-0 masks); JSON is size-capped and
recursion-safe; payloads are validated (checksum, header fields, finiteness and bounds, shapes, base model, config
hash). A bad neighbour, or one whose repo refuses us, is rejected with the peer, revision and reason, and the round
goes on without it. Nothing is unpickled: payloads are safetensors, metadata is JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from peft_sorlora import PayloadError, SparseUpdate

from .hub.base import (
    DEFAULT_BRANCH,
    EntryNotFound,
    FileSource,
    Hub,
    HubError,
    HubUnavailable,
    PushConflictError,
    RepoNotFound,
    RequestTooLarge,
    RevisionNotFound,
    SecondWriterError,
    deadline,
)
from .layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CARD_FILE,
    INFO_FILE,
    INFO_FORMAT,
    UPDATE_FILE,
    check_history,
    check_metrics,
    parse_peer_info,
    round_tag,
)
from .payload import Payload
from .untrusted import read_peer_info

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
    "RoundHook",
    "RoundPull",
    "parse_peer_info",
    "round_tag",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30  # a round-0 payload when this peer has none of its own to size it by
PULL_GRACE_S = 2.0  # beyond a pull's timeout, how long a transfer under way may still be retried


def _json_bytes(info: Mapping[str, object]) -> bytes:
    return json.dumps(info, indent=1, sort_keys=True, allow_nan=False).encode()


class RoundHook(Protocol):
    """Files a peer's round commit carries beyond the exchange, built from the parent revision it commits onto
    (:class:`sorlora_gossip.cards.AdapterCards` writes the adapter card)."""

    def round_files(
        self, peer: Peer, *, parent: str, history: list[dict], metrics: Mapping[str, float], params_updated: int
    ) -> dict[str, bytes]:
        """Extra ``path -> bytes`` for this round's commit (none: ``{}``); must not raise for a bad hub state."""
        ...

    def committed(self, sha: str) -> None:
        """The commit built from the last :meth:`round_files` landed as ``sha``."""
        ...


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
    # neighbours whose round tag names a later commit carrying another payload for the round than the first one
    # (equivocation): that later revision is rejected, the round's first commit is what everyone uses
    equivocations: dict[str, Rejection] = field(default_factory=dict)

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
            **({"equivocations": {p: str(r) for p, r in self.equivocations.items()}} if self.equivocations else {}),
        }


class Peer:
    """One participant of a gossip run on a :class:`~sorlora_gossip.hub.base.Hub` (repo ``hub.repo_id(peer_id)``).

    ``base_model``/``config_hash`` are what neighbours' payloads must match (default: taken from this peer's own
    round-0 update, or from its last pushed ``peer.json`` when resuming). ``payload_cls`` parses pulled payloads:
    :class:`~peft_sorlora.SparseUpdate` (default) or :class:`sorlora_gossip.dense.DenseUpdate` for the dense LoRA baseline.

    ``hook``: what a round's commit carries beyond the exchange (a :class:`RoundHook`), built on top of the peer:
    ``hook=AdapterCards(config, task=...)`` (:class:`sorlora_gossip.cards.AdapterCards`, ``config`` the peer's
    ``SOLoRAConfig.to_dict()``) writes ``README.md``, the adapter card, with every push. Without a hook (the CLI,
    the dense LoRA baseline, whose LoRA config a SO-LoRA card cannot describe) no card is written. A card that
    cannot be made is logged and left out: it never blocks the exchange. ``max_payload_bytes``: the largest round-0 payload accepted from a neighbour while this
    peer has no round-0 payload of its own to size it by.
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
        payload_cls: type[Payload] = SparseUpdate,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        hook: RoundHook | None = None,
    ) -> None:
        self.hub = hub
        self.payload_cls = payload_cls
        self.peer_id = peer_id
        self.repo_id = hub.repo_id(peer_id)
        self.task, self.cluster = task, cluster
        self.base_model, self.config_hash = base_model, config_hash
        self.max_push_attempts = max_push_attempts
        self.max_payload_bytes = max_payload_bytes
        self._masks: dict[str, Any] = {}  # neighbour -> its round-0 payload's structure
        self._caps: dict[str, int] = {}  # neighbour -> most bytes its values-only payloads may take
        self._own: Payload | None = None  # this peer's round-0 payload: the layout neighbours must share
        self._last_sha256: str | None = None
        self._head: str | None = None
        self._last_round: int | None = None
        self._synced = False
        self._last_pull: RoundPull | None = None
        self._rounds: dict[tuple[str, str], tuple[int, str] | None] = {}  # (repo, commit) -> peer.json round, sha256
        self.hook = hook
        # (commit sha, history) of this peer's last commit, so a push needs no read of its own peer.json
        self._parent_state: tuple[str, list[dict]] | None = None

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
        except RepoNotFound:  # nothing pushed yet: the next push creates the repo
            self._head, self._last_round, self._synced = None, None, False
            return None
        try:
            info = self._read_info(self.repo_id, head)
        except EntryNotFound:
            self._head, self._last_round, self._synced = head, None, True
            return None
        last = int(info["round"])
        try:
            tagged = self.hub.resolve(self.repo_id, round_tag(last))
        except RevisionNotFound:
            tagged = None
            logger.warning("peer %s: round %d was committed but not tagged (crash?); tagging %s", self.peer_id, last,
                           head[:12])  # fmt: skip
        if tagged != head and not (tagged and self._is_round_commit(self.repo_id, tagged, last, info["sha256"])):
            self._ensure_tag(round_tag(last), head, last, info["sha256"])
        self.base_model = self.base_model or info.get("base_model")
        self.config_hash = self.config_hash or info.get("config_hash")
        self._head, self._last_round, self._synced = head, last, True
        self._last_sha256 = info["sha256"]
        return last

    def _ensure_tag(self, tag: str, sha: str, round: int, checksum: str) -> None:
        """Tag ``sha`` as ``round``'s revision. A tag already there is kept only if it names a commit of this repo's
        main history with that round's ``peer.json``; one squatted by another writer is replaced (an owner may
        delete its tags), or the push fails saying so: a neighbour would take the squatter's commit for ours."""
        self.hub.create_tag(self.repo_id, tag, revision=sha, exist_ok=True)
        tagged = self.hub.resolve(self.repo_id, tag)
        if tagged == sha or self._is_round_commit(self.repo_id, tagged, round, checksum):
            return
        logger.warning("peer %s: tag %s points at %s, not at this round's commit %s (squatted): replacing it",
                       self.peer_id, tag, tagged[:12], sha[:12])  # fmt: skip
        try:
            self.hub.delete_tag(self.repo_id, tag)
            self.hub.create_tag(self.repo_id, tag, revision=sha, exist_ok=True)
        except HubError as exc:
            raise HubError(f"peer {self.peer_id!r}: tag {tag} was squatted (points at {tagged}) and cannot be "
                           f"replaced: {exc}", repo_id=self.repo_id, revision=tag) from exc  # fmt: skip
        if self.hub.resolve(self.repo_id, tag) != sha:
            raise HubError(f"peer {self.peer_id!r}: tag {tag} keeps being moved away from {sha}",
                           repo_id=self.repo_id, revision=tag)  # fmt: skip

    def _is_round_commit(
        self, repo_id: str, sha: str, round: int, checksum: str | None = None, *, history: list | None = None
    ) -> bool:
        """Whether ``sha`` is on ``repo_id``'s main history and its ``peer.json`` says ``round`` (and ``checksum``)."""
        try:
            history = history if history is not None else self.hub.list_commits(repo_id, revision=DEFAULT_BRANCH)
            if sha not in {c.sha for c in history}:
                return False
            info = self._read_info(repo_id, sha, round=round)
        except (HubError, PayloadError):
            return False
        return checksum is None or info["sha256"] == checksum

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
            info = self._read_info(self.repo_id, sha)
            return PushResult(round=round, sha=sha, bytes=int(info["bytes"]), sha256=info["sha256"], created=False)
        expected = 0 if self._last_round is None else self._last_round + 1
        if round != expected:
            raise ValueError(f"peer {self.peer_id!r}: cannot push round {round}, the next round is {expected}")
        data = data if data is not None else update.to_bytes()
        checksum = hashlib.sha256(data).hexdigest()
        metrics = check_metrics(metrics)
        used = None if self._last_pull is None else sorted(self._last_pull.revisions)
        record = {"round": round, "bytes": len(data), "params_transmitted": int(update.num_values), "neighbours": used}

        def build(parent: str) -> tuple[dict[str, FileSource], list[dict]]:
            history = [*(h for h in self.history_at(parent) if h["round"] < round), record]
            info = self._info(round, data, metrics, history)
            files: dict[str, FileSource] = {UPDATE_FILE: data, INFO_FILE: _json_bytes(info)}
            if self.hook is not None:
                extra = self.hook.round_files(self, parent=parent, history=history, metrics=metrics,
                                              params_updated=int(update.num_values))  # fmt: skip
                files.update({k: v for k, v in extra.items() if k not in (UPDATE_FILE, INFO_FILE)})
            return files, history

        def landed(head: str) -> bool:  # our own earlier attempt may have landed (e.g. its answer was lost)
            head_info = self._read_info(self.repo_id, head)
            return head_info.get("round") == round and head_info.get("sha256") == checksum

        sha = self._commit(f"{self.peer_id}: {tag}", build, landed=landed)
        self._ensure_tag(tag, sha, round, checksum)
        self._head, self._last_round, self._last_sha256 = sha, round, checksum
        if round == 0:
            self._own = update
        return PushResult(round=round, sha=sha, bytes=len(data), sha256=checksum, created=True)

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
        build: Callable[[str], tuple[dict[str, FileSource], list[dict]]],
        *,
        landed: Callable[[str], bool] | None = None,
    ) -> str:
        """Commit ``build(parent)``'s files on top of ``parent``; when the head moved (someone edited the card on the
        hub, another writer), rebuild them on the new head, so what is merged from the parent is never stale."""
        parent = self._head or self.hub.resolve(self.repo_id, DEFAULT_BRANCH)
        for attempt in range(self.max_push_attempts):
            files, history = build(parent)
            try:
                sha = self.hub.create_commit(self.repo_id, files, commit_message=message, parent_commit=parent)
            except PushConflictError:
                seen, parent = parent, self.hub.resolve(self.repo_id, DEFAULT_BRANCH)
                logger.info("peer %s: push conflict on %r, head moved to %s (attempt %d)", self.peer_id, message,
                            parent[:12], attempt + 1)  # fmt: skip
                try:  # do not commit twice
                    if landed is not None and landed(parent):
                        self._parent_state = None
                        return parent
                except (EntryNotFound, PayloadError):
                    pass
                self._check_single_writer(seen, parent)
                continue
            self._parent_state = (sha, history)
            if self.hook is not None:
                self.hook.committed(sha)
            return sha
        raise HubError(f"peer {self.peer_id!r}: {message!r} not pushed after {self.max_push_attempts} conflicts")

    def _check_single_writer(self, seen: str, head: str) -> None:
        """Refuse to push when another live writer of this peer id moved the repo: the new head must extend the
        history this writer saw, and carry the same ``peer.json`` round and payload (card edits are fine)."""
        if seen not in {c.sha for c in self.hub.list_commits(self.repo_id, revision=head)}:
            raise SecondWriterError(f"peer {self.peer_id!r}: {self.repo_id} was rewritten ({head[:12]} does not "
                                    f"extend {seen[:12]}); is a second copy of this peer running?",
                                    repo_id=self.repo_id, revision=head)  # fmt: skip
        try:
            info = self._read_info(self.repo_id, head)
            found: tuple[object, object] = (info["round"], info["sha256"])
        except EntryNotFound:
            found = (None, None)
        except PayloadError:
            found = ("unreadable", None)
        if found != (self._last_round, self._last_sha256):
            raise SecondWriterError(f"peer {self.peer_id!r}: another writer pushed round {found[0]} to {self.repo_id} "
                                    f"({head[:12]}) after this one's round {self._last_round}; refusing to push over it "
                                    "(is a second copy of this peer running?)", repo_id=self.repo_id,
                                    revision=head)  # fmt: skip

    # -- the card ----------------------------------------------------------------------------------------------

    def _read_info(self, repo_id: str, revision: str, round: int | None = None) -> dict:
        """The checked ``peer.json`` of ``repo_id`` at ``revision`` (size-capped before download)."""
        return read_peer_info(self.hub, repo_id, revision=revision, round=round)

    def _info_at(self, revision: str) -> dict | None:
        """This peer's ``peer.json`` at ``revision`` (None before its first round)."""
        try:
            return self._read_info(self.repo_id, revision)
        except EntryNotFound:
            return None

    def history_at(self, revision: str) -> list[dict]:
        """This peer's per-round history (from its ``peer.json``) at ``revision`` of its repo (for hooks too)."""
        if self._parent_state is not None and self._parent_state[0] == revision:
            return list(self._parent_state[1])
        try:
            info = self._info_at(revision)
            return [] if info is None else list(check_history(info.get("history", [])))
        except PayloadError as exc:  # our own history is unreadable: start a new one rather than stop the exchange
            logger.warning("peer %s: %s at %s unusable, history restarts: %s", self.peer_id, INFO_FILE, revision[:12],
                           exc)  # fmt: skip
            return []

    def metrics_at(self, revision: str) -> dict[str, float]:
        """The metrics of this peer's last round at ``revision`` (none before its first round)."""
        info = self._info_at(revision)
        return check_metrics(info.get("metrics") if info is not None else None)

    def commit_files(self, message: str, build: Callable[[str], dict[str, FileSource]]) -> str:
        """Commit ``build(parent)`` on this peer's repo (rebuilt on the new head after a conflict; a second writer
        refused): the entry point for what is built on top of the peer, such as the final adapter publication."""
        if not self._synced:
            self.hub.create_repo(self.repo_id, exist_ok=True)
            self.last_pushed_round()
        sha = self._commit(message, lambda parent: (build(parent), self.history_at(parent)))
        self._head = sha
        return sha

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

        ``neighbours``: peer ids in this hub's namespace or full repo ids (``user/peer``); results are keyed as given.
        Returns the validated updates with the commit each was pinned to; neighbours still missing at the timeout
        are listed in ``skipped``, and neighbours whose payload is bad or whose repo refuses us (401/403, bad name)
        in ``rejected`` (with reasons): one neighbour never aborts the pull. Retries stop at the timeout (plus a few
        seconds for a transfer under way). ``progress(peer, nbytes)`` is called after each neighbour's payload.
        """
        tag = round_tag(round)
        result = RoundPull(round=round)
        repos: dict[str, str] = {}
        for name in dict.fromkeys(neighbours):
            try:
                repo_id = self.hub.repo_id(name)
            except HubError as exc:
                result.rejected[name] = Rejection(peer=name, revision=None, reason=str(exc))
                continue
            if repo_id != self.repo_id:
                repos[name] = repo_id
        pending = list(repos)
        last_error: dict[str, str] = {}
        end = time.monotonic() + timeout
        with deadline(timeout + PULL_GRACE_S):
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
                    except HubError as exc:  # 401/403/400: this neighbour's repo will not serve us
                        pending.remove(peer)
                        self._reject(result, peer, None, exc)
                        continue
                    try:
                        pinned = self._round_commit(repos[peer], round, sha)
                    except HubError as exc:
                        last_error[peer] = str(exc)
                        continue
                    if pinned is None:
                        last_error[peer] = f"{tag} names {sha[:12]}, off {repos[peer]}'s history (squatted?)"
                        continue
                    if pinned != sha:
                        self._check_equivocation(result, peer, repos[peer], round, sha, pinned)
                    pending.remove(peer)
                    self._fetch(peer, repos[peer], round, pinned, result)
                    if progress is not None and peer in result.bytes:
                        progress(peer, result.bytes[peer])
                if not pending or time.monotonic() >= end:
                    break
                time.sleep(min(poll_interval, max(0.0, end - time.monotonic())))
        for peer in pending:
            result.skipped[peer] = f"{tag} not pushed within {timeout:g}s ({last_error.get(peer, 'no answer')})"
            logger.warning("peer %s: skipping neighbour %s in round %d: %s", self.peer_id, peer, round,
                           result.skipped[peer])  # fmt: skip
        self._last_pull = result
        return result

    def _reject(self, result: RoundPull, peer: str, revision: str | None, exc: Exception) -> None:
        rejection = Rejection(peer=peer, revision=revision or getattr(exc, "revision", None), reason=str(exc))
        result.rejected[peer] = rejection
        logger.warning("peer %s: rejected %s", self.peer_id, rejection)

    def _fetch(self, peer: str, repo_id: str, round: int, sha: str, result: RoundPull) -> None:
        try:
            update, info, nbytes, sha = self._load(peer, repo_id, round, sha)
        except (PayloadError, HubError) as exc:
            self._reject(result, peer, sha, exc)
            return
        result.updates[peer], result.infos[peer] = update, info
        result.revisions[peer], result.bytes[peer] = sha, nbytes

    def _load(self, peer: str, repo_id: str, round: int, sha: str) -> tuple[Payload, dict, int, str]:
        """Validate and parse ``peer``'s revision ``sha`` for ``round``; return (update, peer.json, bytes, sha)."""
        if round == 0:
            own = self._own_payload()
            expected = own.structure if own is not None and own.masks is None else None  # dense: same tensors
        else:
            expected = self._neighbour_masks(peer, repo_id)  # first: it sizes this payload exactly
        try:
            sizes = self.hub.file_sizes(repo_id, revision=sha)
            info = self._read_info(repo_id, sha, round=round)
        except EntryNotFound as exc:
            raise PayloadError(f"revision lacks {INFO_FILE}: {exc}", repo_id=repo_id, revision=sha) from exc
        cap = self._payload_cap(peer, round)
        if UPDATE_FILE not in sizes:
            raise PayloadError(f"revision lacks {UPDATE_FILE}", repo_id=repo_id, revision=sha)
        if sizes[UPDATE_FILE] != info["bytes"] or sizes[UPDATE_FILE] > cap:
            raise PayloadError(f"{UPDATE_FILE} is {sizes[UPDATE_FILE]} bytes; {INFO_FILE} says {info['bytes']} and a "
                               f"round-{round} payload may take at most {cap}: not downloaded", repo_id=repo_id,
                               revision=sha)  # fmt: skip
        try:
            data = self.hub.read_bytes(repo_id, UPDATE_FILE, revision=sha, max_bytes=cap)
        except RequestTooLarge as exc:
            raise PayloadError(str(exc), repo_id=repo_id, revision=sha) from exc
        if len(data) != info["bytes"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise PayloadError(
                f"{UPDATE_FILE} does not match {INFO_FILE} ({len(data)} bytes vs {info['bytes']}, checksum differs): "
                "corrupted or truncated"
            )
        update = self.payload_cls.from_bytes(
            data, expected_base_model=self.base_model, expected_config_hash=self.config_hash, masks=expected
        )
        if update.round != round:
            raise PayloadError(f"payload header says round {update.round}, the tag says {round}")
        if (round == 0) != update.has_structure:
            raise PayloadError(f"round {round} payload has_structure={update.has_structure}: wrong kind of payload")
        if round == 0:
            own = self._own_payload()
            if own is not None and own.layout is not None and update.layout != own.layout:
                raise PayloadError("round-0 payload's layers or shapes differ from this peer's")
            self._masks[peer] = update.structure
            self._caps[peer] = update.max_bytes(structure=False)
        return update, info, len(data), sha

    def _round_of(self, repo_id: str, sha: str) -> tuple[int, str] | None:
        """The round and payload sha256 ``sha``'s ``peer.json`` names (None: none or unreadable); commits never change,
        so each is read once."""
        key = (repo_id, sha)
        if key not in self._rounds:
            try:
                info = self._read_info(repo_id, sha)
                self._rounds[key] = (int(info["round"]), str(info["sha256"]))
            except (EntryNotFound, PayloadError):
                self._rounds[key] = None
        return self._rounds[key]

    def _round_commit(self, repo_id: str, round: int, sha: str) -> str | None:
        """The commit to pin for ``round``: the first commit of the owner's main history whose ``peer.json`` says that
        round. History only grows at its end, so every neighbour pinning a round pins the same commit whenever it
        pulls, wherever the tag points (a tag moved to a later commit is an equivocation, a squatted one names a
        commit off that history); None while there is none. A tag naming a commit of that history whose
        ``peer.json`` is unreadable is pinned, to be rejected with the reason when it is loaded."""
        history = self.hub.list_commits(repo_id, revision=DEFAULT_BRANCH)
        for commit in reversed(history):  # oldest first
            found = self._round_of(repo_id, commit.sha)
            if found is not None and found[0] == round:
                if commit.sha != sha and sha not in {c.sha for c in history}:
                    logger.warning("peer %s: %s of %s names %s, off its history (squatted?); pinning %s from its "
                                   "history", self.peer_id, round_tag(round), repo_id, sha[:12], commit.sha[:12])  # fmt: skip
                return commit.sha
            if found is not None and found[0] > round:
                break  # an honest history's rounds only grow: a later round's commit comes after this round's
        on_history = sha in {c.sha for c in history}
        return sha if on_history and self._round_of(repo_id, sha) is None else None

    def _check_equivocation(
        self, result: RoundPull, peer: str, repo_id: str, round: int, sha: str, pinned: str
    ) -> None:
        """Record an equivocation when ``peer``'s round tag names ``sha``, a later commit of its history, that is not
        ``round``'s payload of ``pinned`` (the round's first commit, which is used) again: another payload for the
        round, another round, or an unreadable ``peer.json``."""
        history = {c.sha for c in self.hub.list_commits(repo_id, revision=DEFAULT_BRANCH)}
        tagged, first = self._round_of(repo_id, sha), self._round_of(repo_id, pinned)
        if sha not in history or tagged == first:
            return  # off its history (squatted: logged), or the same payload again (e.g. a later card commit)
        rejection = Rejection(peer=peer, revision=sha, reason=(
            f"equivocation: {round_tag(round)} names {sha[:12]}, a later commit than {pinned[:12]}, the first commit "
            f"of round {round} on its history, and not that commit's payload: the later one is rejected and the "
            "first used"))  # fmt: skip
        result.equivocations[peer] = rejection
        logger.warning("peer %s: %s", self.peer_id, rejection)

    def _payload_cap(self, peer: str, round: int) -> int:
        """The most bytes ``peer``'s round payload may take, known before downloading it."""
        if round > 0 and peer in self._caps:
            return self._caps[peer]
        own = self._own_payload()
        return own.max_bytes(structure=True) if own is not None else self.max_payload_bytes

    def _own_payload(self) -> Payload | None:
        """This peer's round-0 payload (read back from its repo when this process did not push it)."""
        if self._own is None and self._last_round is not None:
            try:
                data = self.hub.read_bytes(self.repo_id, UPDATE_FILE, revision=round_tag(0),
                                           max_bytes=self.max_payload_bytes)  # fmt: skip
                self._own = self.payload_cls.from_bytes(data)
            except (HubError, PayloadError) as exc:
                logger.warning("peer %s: own round-0 payload unreadable (%s)", self.peer_id, exc)
        return self._own

    def _neighbour_masks(self, peer: str, repo_id: str) -> Any:
        """The masks from ``peer``'s round-0 payload (fetched at its ``round-0000`` tag if not seen yet)."""
        if peer not in self._masks:
            sha = self._round_commit(repo_id, 0, self.hub.resolve(repo_id, round_tag(0)))
            if sha is None:
                raise PayloadError(f"its {round_tag(0)} is not on its history", repo_id=repo_id)
            try:
                self._load(peer, repo_id, 0, sha)
            except PayloadError as exc:
                raise PayloadError(f"its round-0 structure (revision {sha}) is unusable: {exc}") from exc
        return self._masks[peer]
