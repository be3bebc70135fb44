"""Registration closing at the deadline of the terms, judged by the commit times the Hub records: fewer members
than the limit, the plan made of exactly those registered before the deadline, a late registration refused naming
the collaboration and the closing commit, and every member (each with its own hub client, over HTTP too)
computing the same closing. Members whose clocks run ahead do not close registration early."""

from __future__ import annotations

import time
import types

import pytest

import sorlora.protocol.program as peer_program
from sorlora.protocol.collab import DEADLINE_MARK, Collaboration, RegistrationClosed, create_collaboration
from sorlora.protocol.program import PeerData, PeerProgram
from sorlora.simulation.engines.local import InProcessEngine
from tests.test_protocol_program import BASE, DATA, TERMS, TOKENIZER, _drive

DEADLINE_S = 6.0  # long enough for two tiny registrations over HTTP on a busy 2-core machine


def _program(hub, tmp_path, user, engine, task="synthetic-alpha"):
    return PeerProgram(hub=hub, collab_id="lab/c", peer_id=f"{user}/dev", state_dir=tmp_path / user,
                       workspace=engine.workspace, data=PeerData(task=task, train=DATA[task]), poll_interval=0.05)  # fmt: skip


@pytest.fixture
def engine():
    """An in-process engine around the shared tiny base, given back clean (no adapters left) after the test."""
    engine = InProcessEngine(base=BASE, tokenizer=TOKENIZER, progress=False)
    yield engine
    engine.release()


def _sleep_past(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.time()) + 0.3)


def test_registration_closes_at_the_deadline_with_the_members_registered_before_it(hub, new_hub, tmp_path, engine):
    terms = TERMS.replace(max_members=3, registration_deadline_s=DEADLINE_S, rounds=1)
    create_collaboration(hub, "lab/c", terms)
    collab = Collaboration(hub, "lab/c")
    deadline = collab.deadline()
    ann, ben = (_program(new_hub(), tmp_path, u, engine, t) for u, t in [("ann", "synthetic-alpha"),
                                                                         ("ben", "synthetic-beta")])  # fmt: skip
    ann.step()
    ben.step()
    ann.step()  # plan: registration still open (2 of 3, deadline not passed)
    assert time.time() < deadline, "the two registrations took longer than the test's deadline"
    assert ann.phase == "plan" and ann.waiting and collab.closing() is None

    _sleep_past(deadline)
    # a third peer registers after the deadline, before anyone else noticed it: its own commit is the first the Hub
    # recorded after the deadline, so it is refused, although it would complete the member limit
    cat = _program(new_hub(), tmp_path, "cat", engine)
    with pytest.raises(RegistrationClosed) as refused:
        cat.step()
    closing = collab.closing()
    assert closing is not None and closing.reason.startswith("the registration deadline (6 s) passed")
    assert [r.peer for r in closing.registrations] == ["ann/dev", "ben/dev"]
    message = str(refused.value)
    assert message.startswith(f"collaboration lab/c closed registration at commit {closing.commit[:12]} (the "
                              "registration deadline")  # fmt: skip
    assert "members: ann/dev, ben/dev): peer cat/dev cannot join it" in message
    assert "members/cat/cat.json" not in message and "cat/dev" not in [r.peer for r in closing.registrations]
    assert len(collab.registrations_at(hub.resolve("lab/c"))[0]) == 3, "cat's file is there, after the closing"

    _drive([ann, ben])  # they plan from the deadline's closing and finish, waiting for nobody
    plan = collab.read_plan()
    assert plan["members"] == ["ann/dev", "ben/dev"] and plan["collab_commit"] == closing.commit
    assert ann.state["plan"] == ben.state["plan"] == plan
    # a fourth peer, long after: refused at once, nothing committed
    head = hub.resolve("lab/c")
    with pytest.raises(RegistrationClosed, match=rf"lab/c closed registration at commit {closing.commit[:12]} .*dan"):
        _program(new_hub(), tmp_path, "dan", engine).step()
    assert hub.resolve("lab/c") == head
    # every member, each with its own client, computes the same closing
    assert all(Collaboration(new_hub(), "lab/c").closing() == closing for _ in range(3))


def test_members_whose_clocks_run_ahead_do_not_close_registration_early(tmp_path, monkeypatch, engine):
    from sorlora_gossip import LocalHub

    hub = LocalHub(tmp_path / "hub", namespace="lab")
    create_collaboration(hub, "lab/c", TERMS.replace(max_members=4, registration_deadline_s=DEADLINE_S, rounds=1))
    collab = Collaboration(hub, "lab/c")
    deadline = collab.deadline()
    ahead = types.SimpleNamespace(time=lambda: time.time() + 3600.0, monotonic=time.monotonic, sleep=time.sleep)
    monkeypatch.setattr(peer_program, "time", ahead)  # every program's local clock: one hour ahead of the hub's
    ann = _program(hub, tmp_path, "ann", engine)
    ann.step()
    ann.step()  # its clock says the deadline passed: it commits a marker, which the Hub records before the deadline
    assert time.time() < deadline
    assert f"members/ann/dev{DEADLINE_MARK}" in hub.list_files("lab/c")
    assert ann.phase == "plan" and ann.waiting and collab.closing() is None
    ben = _program(hub, tmp_path, "ben", engine, "synthetic-beta")
    ben.step()  # still open for the Hub: ben is a member
    assert ben.phase == "plan" and collab.closing() is None
    _sleep_past(deadline)
    _drive([ann, ben])
    plan = collab.read_plan()
    assert plan["members"] == ["ann/dev", "ben/dev"] and plan["collab_commit"] == collab.closing().commit
