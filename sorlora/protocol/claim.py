"""One running copy per peer id: a lock on its state directory and a claim of the peer id in the collaboration repo.

Two copies of one member (two terminals, two machines) would train on the same data and push rounds to the same
repo, and the loser would fail only when it publishes, minutes later. So ``sorlora peer``, before its model loads:

- locks its state directory (:func:`lock_state_dir`: an OS file lock on ``<state dir>/.lock``, released by the OS
  when the process ends, however it ends): a second copy on the same state directory stops at once;
- claims the peer id in the collaboration repo (:class:`PeerClaim`): ``members/<user>/<peer>.claim``, a small JSON
  file naming the state directory's random id, the host name, the process id and the time (never a local path: every
  member reads the repo). A claim of another state directory renewed less than ``ttl_s`` ago stops the second copy,
  naming the first; the running copy renews its claim every half ``ttl_s`` (one small commit). A copy that died is replaced after ``ttl_s``; restarted on its own state
  directory, it is the same claimant and goes on at once. The claim's time is the writer's clock: clocks of the
  lab's machines are assumed to agree within a minute. Claims are written with ``parent_commit`` (optimistic
  concurrency), so of two copies starting together exactly one wins.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from sorlora_gossip.hub.base import (
    DEFAULT_BRANCH,
    EntryNotFound,
    Hub,
    HubError,
    PushConflictError,
    RequestTooLarge,
)
from sorlora_gossip.layout import member_file
from sorlora_gossip.untrusted import read_json

from .terms import TermsError

__all__ = ["CLAIM_TTL_S", "PeerClaim", "PeerIdTaken", "claim_path", "lock_state_dir"]

logger = logging.getLogger(__name__)

CLAIM_TTL_S = 300.0  # a claim not renewed for this long is stale: its copy is taken to be gone
CLAIM_FORMAT = "sorlora-claim/1"
MAX_CLAIM_BYTES = 4096
INSTANCE_FILE = "instance-id"  # in the state directory: the random id its claims carry


class PeerIdTaken(TermsError):
    """Another running copy holds this peer id (its state directory's lock, or a fresh claim on the hub)."""


def claim_path(peer_id: str) -> str:
    """Where the claim of ``peer_id`` ("user/name") lies in the collaboration repo."""
    user, name = peer_id.split("/", 1)
    return member_file(user, name, ".claim")


@contextlib.contextmanager
def lock_state_dir(state_dir: str | os.PathLike[str], peer_id: str) -> Iterator[None]:
    """Hold the OS lock of ``state_dir`` for the block; :class:`PeerIdTaken` at once if another process holds it."""
    path = Path(state_dir)
    path.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path / ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise PeerIdTaken(
            f"peer {peer_id}: another copy is running with state directory {path} (it holds {path / '.lock'}): "
            "stop it, or wait until it is done, before starting this one"
        ) from None
    try:
        yield
    finally:
        lock.release()


class PeerClaim:
    """This state directory's claim of ``peer_id`` in the collaboration repo ``collab_id`` (see the module docstring)."""

    def __init__(self, hub: Hub, collab_id: str, peer_id: str, state_dir: str | os.PathLike[str], *,
                 ttl_s: float = CLAIM_TTL_S) -> None:  # fmt: skip
        self.hub, self.collab_id, self.peer_id, self.ttl_s = hub, collab_id, peer_id, ttl_s
        self.state_dir = Path(state_dir)
        self.path = claim_path(peer_id)
        id_file = self.state_dir / INSTANCE_FILE
        if not id_file.exists():
            self.state_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(secrets.token_hex(16))
        self.instance = id_file.read_text().strip()
        self._renewed = -float("inf")  # time.monotonic() of the last claim written

    def read(self, revision: str = DEFAULT_BRANCH) -> dict[str, Any] | None:
        """The claim on the hub at ``revision`` (None when there is none, or it is not a claim at all)."""
        try:
            claim = read_json(self.hub, self.collab_id, self.path, revision=revision, max_bytes=MAX_CLAIM_BYTES)
        except (EntryNotFound, RequestTooLarge, ValueError):  # PayloadError is a ValueError
            return None
        ok = isinstance(claim, dict) and claim.get("format") == CLAIM_FORMAT and isinstance(claim.get("instance"), str)
        return claim if ok and isinstance(claim.get("time"), (int, float)) else None

    def acquire(self, *, attempts: int = 8) -> None:
        """Claim the peer id, or raise :class:`PeerIdTaken` naming the copy that holds a fresh claim of it."""
        for _ in range(attempts):
            head = self.hub.resolve(self.collab_id)
            claim = self.read(head)
            if claim is not None and claim["instance"] != self.instance:
                age = time.time() - float(claim["time"])
                if age < self.ttl_s:
                    where = f"host {str(claim.get('host', '?'))[:64]}, pid {claim.get('pid', '?')}"
                    raise PeerIdTaken(
                        f"peer {self.peer_id} is already running in {self.collab_id} from another state directory "
                        f"({where}; claim renewed {max(age, 0):.0f} s ago): stop that copy, or rerun it with its "
                        f"own --state-dir; a copy that died frees the id after {self.ttl_s:g} s"
                    )
            try:
                self._write(parent=head)
            except PushConflictError:
                continue
            return
        raise PeerIdTaken(f"peer {self.peer_id}: could not claim its id in {self.collab_id} after {attempts} conflicts")

    def renew(self) -> None:
        """Renew the claim when half its time to live has passed since it was last written (else do nothing). A hub
        that fails now is tried again at the next call: a claim left to age never stops the running copy."""
        if time.monotonic() - self._renewed >= self.ttl_s / 2:
            try:
                self._write(parent=None)
            except HubError as exc:
                self._renewed = time.monotonic() - self.ttl_s / 2 + min(30.0, self.ttl_s / 10)  # again in 30 s
                logger.warning("peer %s: could not renew its claim in %s (%s); trying again", self.peer_id,
                               self.collab_id, exc)  # fmt: skip

    def _write(self, *, parent: str | None) -> None:
        body = {"format": CLAIM_FORMAT, "peer": self.peer_id, "instance": self.instance, "time": time.time(),
                "host": socket.gethostname(), "pid": os.getpid()}  # fmt: skip
        self.hub.create_commit(self.collab_id, {self.path: json.dumps(body, sort_keys=True).encode()},
                               commit_message=f"{self.peer_id}: claim", parent_commit=parent)  # fmt: skip
        self._renewed = time.monotonic()
