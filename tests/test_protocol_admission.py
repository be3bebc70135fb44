"""Issue 22, admission and agreement: junk files, a second peer of one user (Sybil), a late commit of several
registrations, the collaboration owner writing in another user's place (over hub-serve with per-user tokens, real
HTTP), a hostile committed plan.json, a member's own registration rewritten, round-0 masks off the registered
budget, and an equivocating round tag. In each, every honest peer finishes (none crashes) and what was refused is
recorded with its reason. Tiny random Llama; peers stepped in one process."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets

import pytest

from peft_sorlora.base_model import base_fingerprint
from sorlora.data.synthetic import synthetic_task
from sorlora.protocol.collab import Collaboration, RegistrationClosed, create_collaboration
from sorlora.protocol.plan import screen_registrations
from sorlora.protocol.program import PeerData, PeerProgram
from sorlora.protocol.terms import CollabTerms, Registration
from sorlora.runtime.model_loading import TINY_BASE_ID, load_base
from sorlora.simulation.engines.local import InProcessEngine
from sorlora.study.attacks import drive
from sorlora_gossip import HfHub, LocalHub
from sorlora_gossip.hub import HubServer
from sorlora_gossip.layout import INFO_FILE, PLAN_FILE, UPDATE_FILE, member_path, round_tag
from sorlora_gossip.untrusted import MAX_JSON_BYTES

BASE, TOKENIZER, _ = load_base(TINY_BASE_ID)
TERMS = CollabTerms(
    base_model=TINY_BASE_ID, base_fingerprint=base_fingerprint(BASE), method="solora-single", rank=4,
    sparsity=0.5, rounds=2, local_steps=1, batch_size=4, max_len=48, max_members=3, round_timeout_s=2.0,
)  # fmt: skip
DATA = synthetic_task("synthetic-alpha", n_train=12, n_test=2).train


@pytest.fixture
def engine():
    engine = InProcessEngine(base=BASE, tokenizer=TOKENIZER, progress=False)
    yield engine
    engine.release()


def _program(hub, tmp_path, peer_id, engine, cls=PeerProgram, **kwargs):
    return cls(hub=hub, collab_id="lab/c", peer_id=peer_id, state_dir=tmp_path / peer_id.replace("/", "-"),
               workspace=engine.workspace, data=PeerData(task="synthetic-alpha", train=DATA), **kwargs)  # fmt: skip


def _drive(programs, *, max_seconds=180.0) -> dict[str, str]:
    """Step every program until each is done or crashed; the crashes (peer -> 'Type: message')."""
    crashed = drive(programs, max_seconds)
    assert all(p.done or p.peer_id in crashed for p in programs)
    assert not [e for e in crashed.values() if e.startswith("not done after")], crashed
    return crashed


def _report(hub, peer_id: str) -> dict:
    return json.loads(hub.read_bytes(hub.repo_id(peer_id), "report.json", revision="final"))


def _registration(user: str, peer: str = "dev", **changes) -> Registration:
    fields = {"peer": f"{user}/{peer}", "user": user, "task": "synthetic-alpha", "n_train": 12,
              "terms_sha256": TERMS.sha256(), **changes}  # fmt: skip
    return Registration(**fields)


def _write(hub, files: dict[str, bytes], message: str = "junk") -> str:
    return hub.create_commit("lab/c", files, commit_message=message)


def test_junk_files_under_members_take_no_slot(tmp_path, engine):
    hub = LocalHub(tmp_path / "hub", namespace="lab")
    create_collaboration(hub, "lab/c", TERMS)
    junk = {"members/zed/a.json": b"not json", "members/zed/b.json": b'{"format": "x"}',
            "members/zed/c.json": json.dumps(_registration("ann").to_dict()).encode(),  # ann's, at zed's path
            "members/zed/d.json": json.dumps(_registration("zed", "d", n_train=-1).to_dict()).encode(),
            "members/zed/e.json": b" " * (MAX_JSON_BYTES + 1)}  # fmt: skip
    _write(hub, junk)
    programs = [_program(hub, tmp_path, f"{u}/dev", engine) for u in ("ann", "ben", "cat")]
    for p in programs[:2]:
        p.step()
    assert Collaboration(hub, "lab/c").closing() is None, "four junk files and two registrations: still open"
    assert _drive(programs) == {}
    closing = Collaboration(hub, "lab/c").closing()
    assert [r.peer for r in closing.registrations] == ["ann/dev", "ben/dev", "cat/dev"]
    assert sorted(closing.refused) == sorted(junk) and "another path" in closing.refused["members/zed/c.json"]
    assert all(_report(hub, p.peer_id)["records"] for p in programs)


def test_a_second_peer_of_one_user_is_refused_and_takes_no_slot(tmp_path, engine):
    hub = LocalHub(tmp_path / "hub", namespace="lab")
    create_collaboration(hub, "lab/c", TERMS)
    ann, sybil, ben, cat = (_program(hub, tmp_path, p, engine) for p in ("ann/dev", "ann/dev2", "ben/dev", "cat/dev"))
    for p in (ann, sybil, ben):
        p.step()  # ann registers twice: only her first peer counts, so registration is still open
    assert Collaboration(hub, "lab/c").closing() is None
    crashed = _drive([ann, sybil, ben, cat])
    assert set(crashed) == {"ann/dev2"}, crashed
    assert "RegistrationClosed" in crashed["ann/dev2"] and "peers_per_user" in crashed["ann/dev2"]
    assert "\n" not in crashed["ann/dev2"]
    plan = json.loads(hub.read_bytes("lab/c", PLAN_FILE, revision="main"))
    assert plan["members"] == ["ann/dev", "ben/dev", "cat/dev"]
    # the terms may allow more: then the same order admits both of ann's peers
    hub2 = LocalHub(tmp_path / "hub2", namespace="lab")
    two = TERMS.replace(peers_per_user=2)
    create_collaboration(hub2, "lab/c", two)
    collab = Collaboration(hub2, "lab/c")
    for user, peer in (("ann", "dev"), ("ann", "dev2"), ("ben", "dev")):
        reg = _registration(user, peer, terms_sha256=two.sha256())
        collab.register(reg)
    assert [r.peer for r in collab.closing().registrations] == ["ann/dev", "ann/dev2", "ben/dev"]


def test_a_late_commit_of_four_registrations_takes_only_the_slots_left(tmp_path, engine):
    hub = LocalHub(tmp_path / "hub", namespace="lab")
    create_collaboration(hub, "lab/c", TERMS)
    ann, ben, cat = (_program(hub, tmp_path, f"{u}/dev", engine) for u in ("ann", "ben", "cat"))
    ann.step()
    ben.step()
    # one commit, four registrations of users sorted before everyone: by sorted peer id they would take every slot
    mob = {member_path(u, "dev"): json.dumps(_registration(u).to_dict()).encode() for u in ("aa0", "aa1", "aa2", "aa3")}
    _write(hub, mob, "register four at once")
    with pytest.raises(RegistrationClosed, match=r"3 members registered.*cat/dev cannot join"):
        cat.step()
    closing = Collaboration(hub, "lab/c").closing()
    assert [r.peer for r in closing.registrations] == ["aa0/dev", "ann/dev", "ben/dev"], "commit order, then path"
    assert all("after the 3 members" in closing.refused[member_path(u, "dev")] for u in ("aa1", "aa2", "aa3"))
    assert _drive([ann, ben]) == {}  # aa0 never shows up: skipped each round, recorded
    assert all(rec["skipped"] == {"aa0/dev": rec["skipped"]["aa0/dev"]} for rec in _report(hub, "ann/dev")["records"])


def test_the_owner_writing_in_another_user_s_place_is_ignored_over_http(tmp_path, engine):
    users = ["ann", "ben", "cat", "eli"]
    tokens = {u: secrets.token_hex(16) for u in ["coord", *users]}
    with HubServer(tmp_path / "server", tokens=tokens) as server:

        def client(user: str) -> HfHub:
            return HfHub(server.endpoint, token=tokens[user], namespace=user, cache_dir=tmp_path / f"cache-{user}",
                         backoff=0.01, max_backoff=0.05)  # fmt: skip

        owner = client("coord")
        create_collaboration(owner, "coord/c", TERMS)
        programs = {u: PeerProgram(hub=client(u), collab_id="coord/c", peer_id=f"{u}/dev", state_dir=tmp_path / u,
                                   workspace=engine.workspace, data=PeerData(task="synthetic-alpha", train=DATA))
                    for u in users}  # fmt: skip
        programs["ann"].step()  # ann registers
        # the owner rewrites ann's registration (n_train 10**6) and registers dan, who never asked to join
        forged = {member_path("ann", "dev"): json.dumps(_registration("ann", n_train=10**6).to_dict()).encode(),
                  member_path("dan", "dev"): json.dumps(_registration("dan").to_dict()).encode()}  # fmt: skip
        owner.create_commit("coord/c", forged, commit_message="register ann/dev")
        assert [c.authors for c in owner.list_commits("coord/c")][:1] == [("coord",)], "the hub records the author"
        crashed = _drive(list(programs.values()))
        closing = Collaboration(owner, "coord/c").closing()
        assert [r.peer for r in closing.registrations] == ["ben/dev", "cat/dev", "eli/dev"]
        assert all("not by its user" in closing.refused[member_path(u, "dev")] for u in ("ann", "dan"))
        # ann stops with one line naming why; the others go on without her
        assert set(crashed) == {"ann/dev"}, crashed
        assert "RegistrationClosed" in crashed["ann/dev"] and "last written by coord" in crashed["ann/dev"]
        assert "\n" not in crashed["ann/dev"]
        for u in ("ben", "cat", "eli"):
            report = _report(owner, f"{u}/dev")
            assert len(report["records"]) == TERMS.rounds and all(len(rec["used"]) == 2 for rec in report["records"])


def test_a_hostile_committed_plan_binds_nobody(tmp_path, engine):
    hub = LocalHub(tmp_path / "hub", namespace="lab")
    create_collaboration(hub, "lab/c", TERMS)
    programs = [_program(hub, tmp_path, f"{u}/dev", engine) for u in ("ann", "ben", "cat")]
    for p in programs:
        p.step()  # all three register: closed
    hostile = {"format": "sorlora-plan/1", "members": ["ann/dev"], "clusters": [["ann/dev"]], "neighbours": {}}
    _write(hub, {PLAN_FILE: json.dumps(hostile).encode()}, "plan")  # committed first, by anyone
    assert _drive(programs) == {}
    plans = {p.peer_id: _report(hub, p.peer_id)["plan_sha256"] for p in programs}
    assert len(set(plans.values())) == 1, "every member used the same plan: its own"
    for p in programs:
        assert any(d.startswith("members:") for d in p.state["committed_plan_ignored"])
        assert all(len(rec["used"]) == 2 for rec in _report(hub, p.peer_id)["records"])


def test_an_unreadable_committed_plan_binds_nobody(tmp_path, engine):
    hub = LocalHub(tmp_path / "hub", namespace="lab")
    create_collaboration(hub, "lab/c", TERMS.replace(rounds=1))
    programs = [_program(hub, tmp_path, f"{u}/dev", engine) for u in ("ann", "ben", "cat")]
    for p in programs:
        p.step()
    _write(hub, {PLAN_FILE: b"\xff not json"}, "plan")
    assert _drive(programs) == {}
    assert all("not a plan" in p.state["committed_plan_ignored"][0] for p in programs)


def test_a_member_whose_registration_was_rewritten_stops_with_one_line(tmp_path, engine):
    # an open hub records no authors: a rewritten registration is admitted, but its member does not take part under
    # it, and the others go on
    hub = LocalHub(tmp_path / "hub", namespace="lab")
    create_collaboration(hub, "lab/c", TERMS)
    programs = [_program(hub, tmp_path, f"{u}/dev", engine) for u in ("ann", "ben", "cat")]
    programs[0].step()
    forged = _registration("ann", n_train=7, position_mm=(1, 2))
    _write(hub, {member_path("ann", "dev"): json.dumps(forged.to_dict()).encode()}, "register ann/dev")
    crashed = _drive(programs)
    assert set(crashed) == {"ann/dev"} and crashed["ann/dev"].startswith("TermsError: peer ann/dev: ")
    assert "other than the one it wrote (fields n_train, position_mm" in crashed["ann/dev"]
    assert "\n" not in crashed["ann/dev"]
    for u in ("ben", "cat"):
        assert all("ann/dev" in rec["skipped"] for rec in _report(hub, f"{u}/dev")["records"])


class OffBudget(PeerProgram):
    """Registers one entry fewer on one layer than its masks keep (value bytes to match, so the plan accepts it)."""

    def _register(self) -> None:
        register = self.collab.register

        def lying(registration, stats=None, files=None):
            layer = sorted(registration.kept)[0]
            kept = {**registration.kept, layer: registration.kept[layer] - 1}
            itemsize = registration.value_bytes // sum(registration.kept.values())
            registration = dataclasses.replace(registration, kept=kept, value_bytes=sum(kept.values()) * itemsize)
            return register(registration, stats=stats, files=files)

        self.collab.register = lying
        super()._register()

    def _check_own_registration(self, closing) -> None:
        pass  # it knows what it registered


def test_round_0_masks_off_the_registered_budget_are_rejected_by_every_member(tmp_path, engine):
    hub = LocalHub(tmp_path / "hub", namespace="lab")
    terms = TERMS.replace(method="solora", max_members=4, s_max=0.5)  # the cluster topology: members register budgets
    create_collaboration(hub, "lab/c", terms)
    positions = {"ann": (0, 0), "ben": (1000, 0), "cat": (0, 1000), "eve": (1000, 1000)}
    programs = [_program(hub, tmp_path, f"{u}/dev", engine, OffBudget if u == "eve" else PeerProgram,
                         position_mm=positions[u]) for u in positions]  # fmt: skip
    crashed = _drive(programs)
    assert set(crashed) <= {"eve/dev"}, crashed
    plan = json.loads(hub.read_bytes("lab/c", PLAN_FILE, revision="main"))
    assert "eve/dev" in plan["members"], "the registration itself is consistent: the plan takes eve"
    pulled_eve = 0
    for u in ("ann", "ben", "cat"):
        report = _report(hub, f"{u}/dev")
        entries = [*report["records"], *report["exchanges"]]
        assert all("eve/dev" not in e.get("used", {}) for e in entries), "eve's updates are never used"
        assert all(set(e.get("rejected", {})) <= {"eve/dev"} for e in entries), "honest budgets hold"
        reasons = [e["rejected"]["eve/dev"] for e in entries if "eve/dev" in e.get("rejected", {})]
        if reasons:
            pulled_eve += 1
            assert all("registered budget" in why for why in reasons), reasons
    assert pulled_eve >= 1, "some member pulled eve and rejected her"


class Equivocator(PeerProgram):
    """After pushing ``round``, commits another round payload on its main and moves its round tag there."""

    forged: dict[str, str] = {}

    def _train(self) -> None:
        super()._train()
        r = self.state["round"]
        if r != 1:
            return
        repo, first = self.peer.repo_id, self.hub.resolve(self.peer.repo_id, round_tag(r))
        update = dataclasses.replace(self._own, values={k: v + 1.0 for k, v in self._own.values.items()})
        data = update.to_bytes()
        info = json.loads(self.hub.read_bytes(repo, INFO_FILE, revision=first))
        info.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        sha = self.hub.create_commit(repo, {UPDATE_FILE: data, INFO_FILE: json.dumps(info).encode()},
                                     commit_message=f"{self.peer_id}: {round_tag(r)} (again)")  # fmt: skip
        self.hub.delete_tag(repo, round_tag(r))
        self.hub.create_tag(repo, round_tag(r), revision=sha)
        self.peer._head, self.peer._last_sha256 = sha, info["sha256"]  # it goes on from its second version
        Equivocator.forged = {"first": first, "second": sha}


def test_an_equivocating_round_tag_is_a_recorded_rejection_and_everyone_uses_the_first(tmp_path, engine):
    hub = LocalHub(tmp_path / "hub", namespace="lab")
    create_collaboration(hub, "lab/c", TERMS.replace(max_members=4, rounds=3))
    programs = [_program(hub, tmp_path, f"{u}/dev", engine, Equivocator if u == "eve" else PeerProgram)
                for u in ("ann", "ben", "cat", "eve")]  # fmt: skip
    crashed = _drive(programs)
    assert set(crashed) <= {"eve/dev"}, crashed
    first, second = Equivocator.forged["first"], Equivocator.forged["second"]
    assert hub.resolve("eve/dev", round_tag(1)) == second
    for u in ("ann", "ben", "cat"):
        rec = _report(hub, f"{u}/dev")["records"][1]
        assert rec["used"]["eve/dev"] == first, "the round is the first commit carrying it"
        found = [d for d in rec["decisions"] if d["peer"] == "eve/dev" and "equivocation" in d["reason"]]
        assert (
            found and found[0]["round"] == 1 and found[0]["action"] == "rejected" and second[:12] in found[0]["reason"]
        )


def test_registered_names_are_bounded_too():
    regs = [_registration(u) for u in ("ann", "ben", "cat")]
    long_task = _registration("eve", task="t" * 10_000)
    long_layer = _registration("eve", kept={"l" * 10_000: 1}, sizes={"l" * 10_000: 2})
    for hostile in (long_task, long_layer):
        kept, excluded = screen_registrations(TERMS, [*regs, hostile])
        assert [r.peer for r in kept] == ["ann/dev", "ben/dev", "cat/dev"] and "longer than" in excluded["eve/dev"]
