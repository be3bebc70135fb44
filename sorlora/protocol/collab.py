"""A collaboration repo on a hub: its pinned terms, the members' registrations, the plan, and its status.

Layout (:mod:`sorlora_gossip.layout`): ``collab.json`` (written once by the creator), ``members/<user>/<peer>.json``
(each member's own registration, plus its task statistics ``<peer>.h0.safetensors`` for the implicit MoE's
routing) and ``plan.json`` (a cache written once by the first member to commit it: nobody is bound by it, every
member computes its own plan and ignores a committed one that differs).

Admission (:meth:`Collaboration.admission`) cannot be gamed by what a file says: a registration counts only when
it is well-formed (a valid registration of the peer its path names, under these terms) and the commit that last
changed it was authored by its own user (the hub's commit ``authors``, which the committer cannot choose: a
registration the collaboration's owner wrote in another user's place is ignored; an open hub such as the
simulation's records no authors and cannot tell). Admitted ones keep the order the hub's linear history added them
(the commit that last changed each file; ties inside one commit by path), at most ``peers_per_user`` per user (a
Sybil bound), the first ``max_members`` of them. Junk files, other users' writes, a user's extra peers and late
registrations are refused with the reason and take no slot.

Registration closes at the earlier of two commits of the repo's (linear) history, both judged by what the Hub
recorded, never by a local clock:

- the first commit admitting ``max_members`` registrations;
- with ``registration_deadline_s``: the commit just before the first commit the Hub recorded later than the
  terms commit's time plus the deadline. Until some commit is recorded after the deadline, registration is open
  (a registration could still land before it); a member whose own clock says the deadline passed commits a
  marker of its own (:meth:`Collaboration.close_if_due`) so that the Hub records one.

That commit is what every member plans from; history only grows at its end, so once a closing exists it never
moves, and all members agree without talking to each other. Everything read is size-capped and validated.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from peft_sorlora import PayloadError
from sorlora_gossip.hub.base import (
    DEFAULT_BRANCH,
    CommitEntry,
    EntryNotFound,
    Hub,
    PushConflictError,
    RepoNotFound,
    RequestTooLarge,
    RevisionNotFound,
)
from sorlora_gossip.layout import (
    ADMITTED_KEY,
    COLLAB_FILE,
    FINAL_TAG,
    MAX_REPORT_BYTES,
    MEMBERS_DIR,
    PLAN_FILE,
    REPORT_FILE,
    check_history,
    member_file,
    member_path,
)
from sorlora_gossip.untrusted import MAX_JSON_BYTES, read_json, read_peer_info

from .terms import COLLAB_FORMAT, CollabTerms, Registration, TermsError

__all__ = [
    "Admission",
    "Closing",
    "Collaboration",
    "RegistrationClosed",
    "collab_status",
    "create_collaboration",
    "read_capped",
    "stats_path",
]

logger = logging.getLogger(__name__)
MAX_STATS_BYTES = 16 << 20
DEADLINE_MARK = ".deadline"  # members/<user>/<peer>.deadline: a member saw the deadline pass (no registration)


class RegistrationClosed(TermsError):
    """A peer tried to join after registration closed (or is not among the members the plan is made from)."""


def stats_path(user: str, peer: str) -> str:
    """Where a member stores its task statistics (mean layer inputs, the MoE's routing keys) in the collab repo."""
    return member_file(user, peer, ".h0.safetensors")


def files_by_last_change(
    history: Sequence[CommitEntry], ids: Callable[[str], Mapping[str, str]]
) -> Iterator[tuple[CommitEntry, list[tuple[str, CommitEntry]]]]:
    """After each commit of ``history`` (oldest first): the files ``ids(sha)`` lists there (path -> blob id), each
    with the commit that last changed it, in the order the history added them (by path inside one commit). A file's
    place is its last change, so an early placeholder rewritten later reserves nothing; a deleted file leaves."""
    latest: dict[str, tuple[int, CommitEntry]] = {}
    before: Mapping[str, str] = {}
    for index, commit in enumerate(history):
        now = ids(commit.sha)
        for path, oid in now.items():
            if before.get(path) != oid:
                latest[path] = (index, commit)
        for path in set(latest) - set(now):
            del latest[path]
        before = now
        ordered = sorted(latest.items(), key=lambda item: (item[1][0], item[0]))
        yield commit, [(path, changed) for path, (_, changed) in ordered]


def _time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def read_capped(hub: Hub, repo_id: str, path: str, revision: str, limit: int) -> bytes:
    """``path`` of ``repo_id`` at ``revision``, at most ``limit`` bytes (a larger file is a ``TermsError``)."""
    try:
        return hub.read_bytes(repo_id, path, revision=revision, max_bytes=limit)
    except RequestTooLarge as exc:
        raise TermsError(f"{repo_id}/{path}@{revision[:12]}: larger than the {limit} bytes allowed") from exc


def _read_json(hub: Hub, repo_id: str, path: str, revision: str) -> Any:
    try:
        return read_json(hub, repo_id, path, revision=revision, max_bytes=MAX_JSON_BYTES)
    except PayloadError as exc:
        raise TermsError(str(exc)) from exc


def _is_registration_path(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 3 and parts[0] == MEMBERS_DIR and parts[2].endswith(".json")


@dataclass(frozen=True)
class Admission:
    """Who is admitted after one commit of the collaboration's history: ``members`` in the order the history added
    them, and the registration files that do not count (path -> reason)."""

    commit: CommitEntry
    members: tuple[Registration, ...]
    refused: Mapping[str, str]


@dataclass(frozen=True)
class Closing:
    """Where registration closed: the pinned commit, the registrations it admits (sorted by peer id), why it
    closed, and the registration files there that do not count (path -> reason)."""

    commit: str
    registrations: tuple[Registration, ...]
    reason: str
    refused: Mapping[str, str] = field(default_factory=dict)


class Collaboration:
    """The collaboration repo ``collab_id`` ("NS/NAME") on ``hub`` (see the module docstring)."""

    def __init__(self, hub: Hub, collab_id: str) -> None:
        self.hub = hub
        self.repo_id = collab_id
        self._terms: CollabTerms | None = None
        self._created_at: float | None = None
        self._marked_at = -math.inf  # when this object last committed a deadline marker (time.monotonic)
        self._ids_cache: dict[str, dict[str, str]] = {}  # commit sha -> registration path -> blob id
        self._versions: dict[tuple[str, str], tuple[Registration | None, str]] = {}  # (sha, path) -> parsed

    def __repr__(self) -> str:
        return f"Collaboration({self.repo_id!r}, hub={self.hub!r})"

    # ------------------------------------------------------------------ terms
    def terms(self) -> CollabTerms:
        """The pinned terms (read once; they never change)."""
        if self._terms is None:
            try:
                data = _read_json(self.hub, self.repo_id, COLLAB_FILE, DEFAULT_BRANCH)
            except (RepoNotFound, EntryNotFound) as exc:
                raise TermsError(f"no collaboration {self.repo_id!r} on {self.hub!r}: create it with "
                                 "`sorlora collab create`") from exc  # fmt: skip
            if not isinstance(data, dict) or data.get("format") != COLLAB_FORMAT:
                raise TermsError(f"{self.repo_id}/{COLLAB_FILE} is not a {COLLAB_FORMAT} file")
            terms = dict(data.get("terms") or {})
            terms["admitted"] = data.get(ADMITTED_KEY)
            self._terms = CollabTerms.from_dict(terms, source=f"{self.repo_id}/{COLLAB_FILE}")
        return self._terms

    def created_at(self) -> float:
        """When the Hub recorded the commit that wrote the terms (seconds since the epoch; read once)."""
        if self._created_at is None:
            commits = self.hub.list_commits(self.repo_id)
            self._created_at = _time(commits[-2].created_at if len(commits) > 1 else commits[-1].created_at)
        return self._created_at

    # ------------------------------------------------------------------ registrations
    def _ids(self, sha: str) -> dict[str, str]:
        """Registration path -> git blob id at commit ``sha`` (commits never change: read once per object)."""
        if sha not in self._ids_cache:
            self._ids_cache[sha] = {p: oid for p, oid in self.hub.file_ids(self.repo_id, revision=sha).items()
                                    if _is_registration_path(p)}  # fmt: skip
        return self._ids_cache[sha]

    def _version(self, commit: CommitEntry, path: str) -> tuple[Registration | None, str]:
        """The registration ``commit`` wrote at ``path``, or None and why it does not count: unreadable or malformed,
        at another peer's path, under other terms, or written by a user other than its own (the hub's ``authors``;
        an open hub records none, and then anyone may write anything, see the module docstring)."""
        key = (commit.sha, path)
        if key not in self._versions:
            try:
                reg = Registration.from_dict(_read_json(self.hub, self.repo_id, path, commit.sha), source=path)
                if member_path(reg.user, reg.peer.split("/", 1)[1]) != path:
                    raise TermsError(f"{path}: names peer {reg.peer!r}, which belongs at another path")
                if reg.terms_sha256 != self.terms().sha256():
                    raise TermsError(f"{path}: made under other terms ({reg.terms_sha256[:12]} vs "
                                     f"{self.terms().sha256()[:12]})")  # fmt: skip
                if commit.authors and reg.user not in commit.authors:
                    raise TermsError(f"{path}: last written by {', '.join(commit.authors)} (commit {commit.sha[:12]}), "
                                     f"not by its user {reg.user}: another user's registration is ignored")  # fmt: skip
                self._versions[key] = (reg, "")
            except (TermsError, EntryNotFound) as exc:
                self._versions[key] = (None, str(exc))
        return self._versions[key]

    def admission(self, history: Sequence[CommitEntry]) -> Iterator[Admission]:
        """The admission after each commit of ``history`` (oldest first), in order (see :class:`Admission`).

        A registration's place is the commit that last changed its file (so a placeholder reserves nothing);
        registrations of one commit go by path. Only well-formed ones count (:meth:`_version`); then at most
        ``peers_per_user`` per user and ``max_members`` in all, in that order."""
        terms = self.terms()
        for commit, files in files_by_last_change(history, self._ids):
            admitted: list[Registration] = []
            refused: dict[str, str] = {}
            per_user: dict[str, int] = {}
            for path, changed in files:
                reg, why = self._version(changed, path)
                if reg is None:
                    refused[path] = why
                elif per_user.get(reg.user, 0) >= terms.peers_per_user:
                    refused[path] = (f"user {reg.user} registered {terms.peers_per_user} peer(s) before this one "
                                     "(the terms' peers_per_user)")  # fmt: skip
                elif len(admitted) >= terms.max_members:
                    refused[path] = f"registered after the {terms.max_members} members the terms admit"
                else:
                    per_user[reg.user] = per_user.get(reg.user, 0) + 1
                    admitted.append(reg)
            yield Admission(commit=commit, members=tuple(admitted), refused=refused)

    def registrations_at(self, revision: str) -> tuple[list[Registration], dict[str, str]]:
        """The registrations admitted at ``revision`` (sorted by peer id), and the refused files (path -> reason)."""
        history = list(reversed(self.hub.list_commits(self.repo_id, revision=revision)))
        *_, last = self.admission(history)
        return sorted(last.members, key=lambda r: r.peer), dict(last.refused)

    def deadline(self) -> float | None:
        """The registration deadline (seconds since the epoch, Hub time), or None when only the member limit closes."""
        seconds = self.terms().registration_deadline_s
        return None if seconds is None else self.created_at() + seconds

    def closing(self) -> Closing | None:
        """The commit registration closed at, or None while it is open (see the module docstring)."""
        terms = self.terms()
        history = list(reversed(self.hub.list_commits(self.repo_id)))  # oldest first; the hub's history is linear
        deadline = self.deadline()
        last, reason = len(history) - 1, None
        if deadline is not None:
            after = next((i for i, c in enumerate(history) if _time(c.created_at) > deadline), None)
            if after is not None:
                last = after - 1  # the member limit can only close earlier than this
                reason = (f"the registration deadline ({terms.registration_deadline_s:g} s) passed at commit "
                          f"{history[after].sha[:12]}")  # fmt: skip
        found = None
        for admission in self.admission(history[: last + 1]):
            found = admission
            if len(admission.members) >= terms.max_members:
                reason = f"{terms.max_members} members registered"
                break
        if reason is None or found is None:
            return None
        for path, why in found.refused.items():
            logger.warning("collaboration %s: registration %s refused: %s", self.repo_id, path, why)
        return Closing(commit=found.commit.sha, registrations=tuple(sorted(found.members, key=lambda r: r.peer)),
                       reason=reason, refused=dict(found.refused))  # fmt: skip

    def close_if_due(self, peer: str, *, now: float, min_interval: float = 1.0) -> Closing | None:
        """The closing; when there is none yet but the deadline passed by the local clock ``now``, first commit
        ``peer``'s deadline marker so the Hub records a commit after the deadline (by its own clock: a member whose
        clock runs ahead only adds a marker from before the deadline, which closes nothing). At most one marker per
        ``min_interval`` seconds from this object."""
        closing = self.closing()
        deadline = self.deadline()
        if closing is not None or deadline is None or now <= deadline:
            return closing
        if time.monotonic() - self._marked_at < min_interval:
            return None
        self._marked_at = time.monotonic()
        user, name = peer.split("/", 1)
        marker = member_file(user, name, DEADLINE_MARK)
        body = json.dumps({"peer": peer, "local_time": now, "deadline": deadline}).encode()
        self.hub.create_commit(self.repo_id, {marker: body}, commit_message=f"{peer}: registration deadline passed")
        return self.closing()

    def register(
        self,
        registration: Registration,
        *,
        stats: dict[str, torch.Tensor] | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> str:
        """Commit ``registration`` with the member's task statistics and other ``files`` of its own (e.g. the
        sequence router's centroids) in one commit; idempotent; refused once registration closed."""
        user, name = registration.peer.split("/", 1)
        path = member_path(user, name)
        own = path.removesuffix(".json") + "."
        foreign = [f for f in files or {} if not f.startswith(own)]
        if foreign:
            raise ValueError(f"register: {foreign} are not files of {registration.peer} (they must start with {own})")
        closing = self.closing()
        if closing is not None:
            if any(r.peer == registration.peer for r in closing.registrations):
                return closing.commit
            raise self.refusal(closing, registration.peer)
        files = {**(files or {}), path: json.dumps(registration.to_dict(), indent=1, sort_keys=True).encode()}
        if stats is not None:
            files[stats_path(user, name)] = save_safetensors({k: v.contiguous() for k, v in sorted(stats.items())})
        try:
            existing = read_json(self.hub, self.repo_id, path, revision=DEFAULT_BRANCH)
        except (EntryNotFound, PayloadError):
            existing = None  # none yet, or unreadable: (re)written below
        if existing == registration.to_dict():
            sha = self.hub.resolve(self.repo_id)
        else:
            sha = self.hub.create_commit(self.repo_id, files, commit_message=f"register {registration.peer}")
        closing = self.closing()  # the Hub may have recorded this very commit after the deadline
        if closing is not None and all(r.peer != registration.peer for r in closing.registrations):
            raise self.refusal(closing, registration.peer)
        return sha

    def refusal(self, closing: Closing, peer: str) -> RegistrationClosed:
        """The error refusing ``peer``, which is not among the members registration closed with (naming why its
        registration file there does not count, when there is one)."""
        user, name = peer.split("/", 1)
        why = closing.refused.get(member_path(user, name))
        return RegistrationClosed(
            f"collaboration {self.repo_id} closed registration at commit {closing.commit[:12]} "
            f"({closing.reason}; members: {', '.join(r.peer for r in closing.registrations) or 'none'}): "
            f"peer {peer} cannot join it" + (f": its registration does not count: {why}" if why else "")
            + "; ask its creator for a new collaboration"
        )  # fmt: skip

    def member_stats(self, peer: str, *, revision: str) -> dict[str, torch.Tensor]:
        """A member's task statistics (layer -> mean input), validated: finite float tensors only."""
        user, name = peer.split("/", 1)
        path = stats_path(user, name)
        data = read_capped(self.hub, self.repo_id, path, revision, MAX_STATS_BYTES)
        try:
            tensors = load_safetensors(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure of untrusted bytes is a refusal
            raise TermsError(f"{self.repo_id}/{path}: not a safetensors file: {exc}") from exc
        bad = [k for k, v in tensors.items() if not v.is_floating_point() or not torch.isfinite(v).all()]
        if bad:
            raise TermsError(f"{self.repo_id}/{path}: tensors {bad[:3]} are not finite floats")
        return tensors

    # ------------------------------------------------------------------ plan
    def read_plan(self) -> dict[str, Any] | None:
        """The committed plan, or None before any member committed one."""
        try:
            return _read_json(self.hub, self.repo_id, PLAN_FILE, DEFAULT_BRANCH)
        except EntryNotFound:
            return None

    def commit_plan(self, plan: dict[str, Any], *, attempts: int = 8) -> dict[str, Any]:
        """Commit ``plan`` unless a plan is there already (the first wins); return the plan now on the hub."""
        for _ in range(attempts):
            existing = self.read_plan()
            if existing is not None:
                return existing
            head = self.hub.resolve(self.repo_id)
            try:
                self.hub.create_commit(self.repo_id, {PLAN_FILE: json.dumps(plan, indent=1, sort_keys=True).encode()},
                                       commit_message="plan", parent_commit=head)  # fmt: skip
            except PushConflictError:
                continue
            return plan
        raise TermsError(f"{self.repo_id}: could not commit {PLAN_FILE} after {attempts} conflicts")


def create_collaboration(hub: Hub, collab_id: str, terms: CollabTerms, *, exist_ok: bool = False) -> Collaboration:
    """Create the collaboration repo ``collab_id`` with ``terms``; an existing one with the same terms is kept."""
    collab = Collaboration(hub, collab_id)
    if hub.repo_exists(collab_id):
        try:
            existing = collab.terms()
        except TermsError:
            existing = None
        if existing is not None:
            if existing.sha256() != terms.sha256():
                raise TermsError(f"collaboration {collab_id} exists with other terms (sha {existing.sha256()[:12]})")
            if not exist_ok:
                raise TermsError(f"collaboration {collab_id} exists already")
            return collab
    hub.create_repo(collab_id, exist_ok=True, private=not terms.public)  # terms.public: who may read it
    body = terms.to_dict()
    admitted = body.pop("admitted")
    data = {"format": COLLAB_FORMAT, "terms": body, ADMITTED_KEY: admitted}
    hub.create_commit(collab_id, {COLLAB_FILE: json.dumps(data, indent=1, sort_keys=True).encode()},
                      commit_message="collaboration terms")  # fmt: skip
    return collab


def _report_summary(report: object) -> dict[str, Any]:
    """What :func:`collab_status` shows of a member's final ``report.json``: the neighbours it skipped over all
    rounds, the bytes its inter-cluster exchanges pulled and the MoE repo it names (where it names one).
    Raises TypeError/KeyError/AttributeError on a report of another shape."""
    if not isinstance(report, dict):
        raise TypeError(f"{REPORT_FILE} is a {type(report).__name__}, expected an object")
    summary: dict[str, Any] = {
        "skipped": sum(len(rec.get("skipped") or {}) for rec in report.get("records", [])),
        "inter_cluster_bytes": sum(int(e["bytes_pulled"]) for e in report.get("exchanges", [])),
    }
    moe = report.get("moe")
    if isinstance(moe, dict) and isinstance(moe.get("repo"), str):
        summary["moe"] = moe["repo"]  # the collaboration's MoE, as this member names it
    return summary


def collab_status(hub: Hub, collab_id: str) -> dict[str, Any]:
    """What ``sorlora collab status`` shows, read from the hub: the terms' hash, method and limits, whether
    registration is open, the admitted members (task, size, last round, bytes pushed, skipped neighbours, whether
    final, the MoE its final report names), the refused files with their reasons and the committed plan."""
    collab = Collaboration(hub, collab_id)
    terms = collab.terms()
    closing = collab.closing()  # once closed, it holds the admission at the closing commit
    regs, refused = ((list(closing.registrations), dict(closing.refused)) if closing else
                     collab.registrations_at(hub.resolve(collab_id)))  # fmt: skip
    plan = collab.read_plan()
    members = []
    for reg in regs:
        row = {"peer": reg.peer, "task": reg.task, "n_train": reg.n_train, "round": None, "bytes_pushed": 0,
               "final": False, "skipped": 0}  # fmt: skip
        repo = hub.repo_id(reg.peer)
        try:  # a member's own files: size-capped and parsed safely; a bad one is named, not fatal
            info = read_peer_info(hub, repo, revision=DEFAULT_BRANCH)
            row["round"] = info["round"]
            row["bytes_pushed"] = sum(h["bytes"] for h in check_history(info.get("history", [])))
            report = read_json(
                hub, repo, REPORT_FILE, revision=hub.resolve(repo, FINAL_TAG), max_bytes=MAX_REPORT_BYTES
            )
            row["final"] = True
            row.update(_report_summary(report))
        except (RepoNotFound, RevisionNotFound, EntryNotFound):
            pass  # not pushed yet, or not final yet
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # PayloadError is a ValueError
            row["unreadable"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        members.append(row)
    return {"collab": collab_id, "terms_sha256": terms.sha256(), "method": terms.method,
            "max_members": terms.max_members, "rounds": terms.rounds,
            "registration": "closed" if closing else "open", "closed_at": closing.commit if closing else None,
            "members": members, "refused": refused, "plan": plan}  # fmt: skip
