"""The peer program on its own: collaboration terms and registration, decentralized agreement on the plan, and the
faults of a real collaboration (a member that never shows up, a late joiner, a member whose plan differs), with
peers stepped in one process on a LocalHub and a tiny random model."""

from __future__ import annotations

import json
import time

import pytest
import torch

from peft_sorlora.base_model import base_fingerprint
from sorlora.data.synthetic import synthetic_task
from sorlora.protocol.collab import Collaboration, RegistrationClosed, create_collaboration
from sorlora.protocol.plan import compute_plan
from sorlora.protocol.program import PeerData, PeerProgram
from sorlora.protocol.terms import CollabTerms, Registration, TermsError
from sorlora.runtime.model_loading import TINY_BASE_ID, load_base
from sorlora.simulation.engines.local import InProcessEngine
from sorlora_gossip import LocalHub

BASE, TOKENIZER, _ = load_base(TINY_BASE_ID)
TERMS = CollabTerms(
    base_model=TINY_BASE_ID, base_fingerprint=base_fingerprint(BASE), method="solora-single", rank=4,
    sparsity=0.5, rounds=2, local_steps=1, batch_size=4, max_len=48, max_members=4, round_timeout_s=1.5,
    publish_base=True,
)  # fmt: skip
DATA = {t: synthetic_task(t, n_train=12, n_test=2).train for t in ("synthetic-alpha", "synthetic-beta")}


@pytest.fixture
def engine():
    """An in-process engine around the shared tiny base, given back clean (no adapters left) after the test."""
    engine = InProcessEngine(base=BASE, tokenizer=TOKENIZER, progress=False)
    yield engine
    engine.release()


def _programs(hub, tmp_path, users, *, engine, collab="lab/c"):
    return [
        PeerProgram(hub=hub, collab_id=collab, peer_id=f"{u}/dev", state_dir=tmp_path / u, workspace=engine.workspace,
                    data=PeerData(task=t, train=DATA[t]))
        for u, t in zip(users, ["synthetic-alpha", "synthetic-beta"] * 4)
    ]  # fmt: skip


def _drive(programs, *, max_seconds=120.0):
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        live = [p for p in programs if not p.done]
        if not live:
            return
        for p in live:
            p.step()
        if all(p.waiting for p in live):
            time.sleep(0.05)
    raise AssertionError(f"not done after {max_seconds} s: {[(p.peer_id, p.phase) for p in programs]}")


def test_terms_refuse_a_local_path_as_the_base_model():
    with pytest.raises(TermsError, match="not a path"):
        TERMS.replace(base_model="/home/me/models/smollm")
    with pytest.raises(TermsError, match="unknown terms"):
        CollabTerms.from_dict({**TERMS.to_dict(), "roundz": 3})


def test_a_member_that_never_shows_up_is_skipped_and_recorded_and_costs_one_timeout(tmp_path, engine):
    terms = TERMS.replace(rounds=4, round_timeout_s=8.0)
    hub = LocalHub(tmp_path / "hub", namespace="lab")
    create_collaboration(hub, "lab/c", terms)
    programs = _programs(hub, tmp_path, ["ann", "ben", "cat", "ghost"], engine=engine)
    ghost = programs.pop()
    ghost.step()  # registers, then is never seen again
    assert ghost.phase == "plan"
    started = time.monotonic()
    _drive(programs)
    elapsed = time.monotonic() - started
    assert elapsed < 2 * terms.round_timeout_s, f"{elapsed:.0f} s: the others waited for the ghost more than once"
    for p in programs:
        report = json.loads(hub.read_bytes(hub.repo_id(p.peer_id), "report.json", revision="final"))
        skipped = [rec["skipped"] for rec in report["records"]]
        assert [sorted(s) for s in skipped] == [["ghost/dev"]] * terms.rounds
        assert skipped[0]["ghost/dev"] == "round-0000 not pushed within 8 s"
        assert all("nothing pushed since it missed round-0000: not waited for" in s["ghost/dev"] for s in skipped[1:])
        assert all(len(rec["used"]) == 2 for rec in report["records"]), "the other two members were used"
    assert not hub.repo_exists("ghost/dev")


def test_a_member_that_missed_a_round_is_waited_for_again_once_it_catches_up(tmp_path, engine):
    """A member stalled in round 0 (as one restarting) is skipped there; once it has pushed that round, the others
    wait for it again and use it in every later round."""
    terms = TERMS.replace(rounds=3, round_timeout_s=4.0)
    hub = LocalHub(tmp_path / "hub", namespace="lab")
    create_collaboration(hub, "lab/c", terms)
    programs = _programs(hub, tmp_path, ["ann", "ben", "cat", "dan"], engine=engine)
    dan = programs[-1]
    deadline = time.monotonic() + 60
    while dan.phase != "train" and time.monotonic() < deadline:  # everyone registers, plans, calibrates
        for p in programs:
            p.step()
    assert dan.phase == "train" and dan.state["round"] == 0
    others = programs[:3]
    while any((p.state["round"], p.phase) != (1, "pull") for p in others) and time.monotonic() < deadline:
        for p in others:  # dan stalls: skipped in round 0; the others push round 1 and wait for their neighbours
            if (p.state["round"], p.phase) != (1, "pull"):
                p.step()
        time.sleep(0.05)
    assert all((p.state["round"], p.phase) == (1, "pull") for p in others)
    while dan.state["round"] == 0 and time.monotonic() < deadline:  # dan catches up: pushes and pulls round 0
        dan.step()
    _drive(programs)
    for p in others:
        report = json.loads(hub.read_bytes(hub.repo_id(p.peer_id), "report.json", revision="final"))
        records = report["records"]
        assert (
            list(records[0]["skipped"]) == ["dan/dev"] and "not pushed within 4 s" in records[0]["skipped"]["dan/dev"]
        )
        assert all(not rec["skipped"] and "dan/dev" in rec["used"] for rec in records[1:]), records[1:]


def test_a_late_joiner_is_refused_clearly(tmp_path, engine):
    hub = LocalHub(tmp_path / "hub", namespace="lab")
    create_collaboration(hub, "lab/c", TERMS)
    programs = _programs(hub, tmp_path, ["ann", "ben", "cat", "dan", "eve"], engine=engine)
    for p in programs[:4]:
        p.step()
    with pytest.raises(RegistrationClosed, match=r"closed registration at commit .*4 members registered.*eve/dev"):
        programs[4].step()
    assert "members/eve/dev.json" not in hub.list_files("lab/c")


def test_a_member_computing_another_plan_uses_its_own_and_records_the_difference(tmp_path, engine, monkeypatch):
    hub = LocalHub(tmp_path / "hub", namespace="lab")
    create_collaboration(hub, "lab/c", TERMS.replace(method="oracle"))
    programs = _programs(hub, tmp_path, ["ann", "ben", "cat", "dan"], engine=engine)
    for p in programs:
        p.step()  # every member registers
    for p in programs[:3]:
        p.step()  # three plan: the first commits, the next two recompute and agree
        assert p.phase == "calibrate"
    collab = Collaboration(hub, "lab/c")
    closing = collab.closing()
    assert collab.read_plan() == compute_plan(collab.terms(), closing.registrations, collab_commit=closing.commit)
    # the fourth runs other software: its topology puts everyone in one cluster
    from sorlora.protocol import plan as plan_module

    monkeypatch.setitem(plan_module.TOPOLOGIES, "task", plan_module.TOPOLOGIES["single"])
    programs[3].step()  # the committed plan is a cache: nobody is bound by it
    assert programs[3].phase == "calibrate"
    assert programs[3].plan["clusters"] == [["ann/dev", "ben/dev", "cat/dev", "dan/dev"]]
    assert any(d.startswith("clusters: committed [['ann/dev', 'cat/dev']")
               for d in programs[3].state["committed_plan_ignored"])  # fmt: skip


def test_a_peer_refuses_terms_it_did_not_agree_to(tmp_path):
    hub = LocalHub(tmp_path / "hub", namespace="lab")
    create_collaboration(hub, "lab/c", TERMS)
    program = PeerProgram(hub=hub, collab_id="lab/c", peer_id="ann/dev", state_dir=tmp_path / "ann",
                          data=PeerData(task="t", train=DATA["synthetic-alpha"]), expected_terms="0" * 64)  # fmt: skip
    with pytest.raises(TermsError, match="not the 000000000000 this peer agreed to"):
        program.step()

    # the 12-digit prefix that `sorlora collab create` prints is accepted, as is the whole hash; a wrong prefix is not
    sha = create_collaboration(hub, "lab/c", TERMS, exist_ok=True).terms().sha256()
    for agreed in (sha[:12], sha, sha[:12].upper()):
        ok = PeerProgram(hub=hub, collab_id="lab/c", peer_id="ann/dev", state_dir=tmp_path / f"ok-{agreed}",
                         data=PeerData(task="t", train=DATA["synthetic-alpha"]), expected_terms=agreed)  # fmt: skip
        ok._prepare()
        assert ok.terms.sha256() == sha
    wrong = ("1" if sha[0] != "1" else "2") + sha[1:12]
    refused = PeerProgram(hub=hub, collab_id="lab/c", peer_id="ann/dev", state_dir=tmp_path / "wrong",
                          data=PeerData(task="t", train=DATA["synthetic-alpha"]), expected_terms=wrong)  # fmt: skip
    with pytest.raises(TermsError, match="this peer agreed to"):
        refused.step()


def test_a_registration_commits_only_the_members_own_files_with_it(tmp_path):
    hub = LocalHub(tmp_path / "hub", namespace="lab")
    collab = create_collaboration(hub, "lab/c", TERMS)
    reg = Registration(peer="ann/dev", user="ann", task="t", n_train=4, terms_sha256=collab.terms().sha256())
    with pytest.raises(ValueError, match="not files of ann/dev"):
        collab.register(reg, files={"members/bob/dev.centroids.safetensors": b"x"})
    sha = collab.register(reg, files={"members/ann/dev.centroids.safetensors": b"x"})
    files = hub.list_files("lab/c", revision=sha)
    assert {"members/ann/dev.json", "members/ann/dev.centroids.safetensors"} <= set(files)
    assert not any(f.startswith("members/bob/") for f in files), "the refused call committed nothing"


def test_the_base_must_be_the_pinned_one(tmp_path):
    hub = LocalHub(tmp_path / "hub", namespace="lab")
    create_collaboration(hub, "lab/c", TERMS.replace(base_fingerprint="feedfacefeedface"))
    program = PeerProgram(hub=hub, collab_id="lab/c", peer_id="ann/dev", state_dir=tmp_path / "ann",
                          data=PeerData(task="t", train=DATA["synthetic-alpha"]))  # fmt: skip
    with pytest.raises(TermsError, match="fingerprint .* are not the pinned base tiny-random-llama"):
        program.step()


def test_programs_in_one_process_share_equal_tensors_and_publish_the_same(tmp_path):
    terms = TERMS.replace(method="solora", s_max=0.5, rounds=1)
    published = {}
    base, tokenizer, _ = load_base(TINY_BASE_ID)  # the same weights, no adapters left by the other tests
    for pooled in (True, False):
        hub = LocalHub(tmp_path / f"hub-{pooled}", namespace="lab")
        create_collaboration(hub, "lab/c", terms)
        engine = InProcessEngine(base=base, tokenizer=tokenizer, progress=False)
        if not pooled:
            engine.tensor_pool = None
        programs = _programs(hub, tmp_path / str(pooled), ["ann", "ben", "cat", "dan"], engine=engine)
        for p in programs:
            p.tensor_pool = engine.tensor_pool
        try:
            deadline = time.monotonic() + 120
            while any(p.phase != "publish" for p in programs) and time.monotonic() < deadline:
                for p in programs:
                    if p.phase != "publish":
                        p.step()
            # every program holds every member's round-0 structure (its cluster's, then the others' for the experts)
            held = {q: [p.structure[q] for p in programs if q in p.structure and q != p.index] for q in range(4)}
            assert all(len(v) == 3 for v in held.values()), {q: len(v) for q, v in held.items()}
            for structures in held.values():
                first = structures[0]
                for other in structures[1:]:
                    for key, mask in first.masks.items():
                        assert torch.equal(other.masks[key], mask)
                        assert (other.masks[key] is mask) == pooled, "one copy of each pulled mask with the pool"
            _drive(programs)
            assert all(p.done and not p.view and not p.structure for p in programs), "done programs hold nothing"
        finally:
            engine.release()
        published[pooled] = {p.peer_id: hub.read_bytes(p.peer_id, "expert.safetensors", revision="final")
                             for p in programs}  # fmt: skip
    assert published[True] == published[False]
