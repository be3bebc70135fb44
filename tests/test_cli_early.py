"""The CLI tells the truth early: everything that needs no model is checked before the model loads, in one line.

Each refusal is asserted to come before any model load by passing ``--model`` a path that does not exist (loading it
would end in another error) and by its time: a fifth peer, a missing or refused token, a wrong namespace, terms the
peer did not agree to, a second copy of a running peer id (same state directory, or another one: a real second OS
process holds the id), and for ``collab create`` a terms typo or an existing collaboration id.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peft_sorlora.base_model import base_fingerprint
from sorlora.cli import main
from sorlora.data.synthetic import synthetic_task
from sorlora.protocol.claim import claim_path
from sorlora.protocol.collab import create_collaboration
from sorlora.protocol.terms import CollabTerms, Registration
from sorlora.runtime.model_loading import TINY_BASE_ID, load_base
from sorlora.simulation.engines.processes import write_examples
from sorlora_gossip import LocalHub
from sorlora_gossip.hub import HfHub, HubServer

TERMS = CollabTerms(base_model=TINY_BASE_ID, base_fingerprint=base_fingerprint(load_base(TINY_BASE_ID)[0]),
                    method="solora-single", rank=4, rounds=1, local_steps=1, batch_size=2, max_len=48, max_members=2,
                    round_timeout_s=60.0)  # fmt: skip
FAST = 20.0  # seconds: far below a model load on a loaded machine, far above a few small reads


@pytest.fixture
def data_file(tmp_path):
    return str(write_examples(tmp_path / "mine.jsonl", synthetic_task("synthetic-alpha", n_train=8, n_test=2).train))


def _peer(hub, peer_id, data_file, *extra, collab="lab/c"):
    """``sorlora peer`` in this process with a base that cannot load; returns (exit code, seconds)."""
    started = time.monotonic()
    state = [] if "--state-dir" in extra else ["--state-dir", str(Path(data_file).parent / "state" / peer_id)]
    code = main(["peer", "--hub", str(hub), "--collab", collab, "--peer-id", peer_id, "--data", data_file, "--task",
                 "mine", "--model", "/no/such/model", "--no-progress", *state, *extra])  # fmt: skip
    return code, time.monotonic() - started


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "/no/such/model" not in lines[0], "the model was never loaded"
    return lines[0]


def test_a_fifth_peer_is_refused_before_the_model_loads(tmp_path, data_file, capsys):
    hub = LocalHub(tmp_path / "hub", namespace="lab")
    collab = create_collaboration(hub, "lab/c", TERMS)
    sha = collab.terms().sha256()
    for user in ("ann", "ben"):
        collab.register(Registration(peer=f"{user}/dev", user=user, task="t", n_train=4, terms_sha256=sha))
    code, seconds = _peer(tmp_path / "hub", "eve/dev", data_file)
    line = _error(capsys)
    assert code == 2 and "closed registration" in line and "eve/dev cannot join" in line, line
    assert seconds < FAST
    assert claim_path("eve/dev") not in hub.list_files("lab/c"), "a refused peer claims nothing"
    assert not hub.repo_exists("eve/dev"), "and creates no repo"


def test_terms_the_peer_did_not_agree_to_are_refused_before_the_model_loads(tmp_path, data_file, capsys):
    hub = LocalHub(tmp_path / "hub", namespace="lab")
    sha = create_collaboration(hub, "lab/c", TERMS).terms().sha256()
    wrong = ("1" if sha[0] != "1" else "2") + sha[1:12]
    code, seconds = _peer(tmp_path / "hub", "ann/dev", data_file, "--terms-sha", wrong)
    line = _error(capsys)
    assert code == 2 and f"not the {wrong} this peer agreed to" in line and seconds < FAST, line
    # the 12-digit prefix `collab create` prints is accepted (then the missing model is what stops it)
    assert _peer(tmp_path / "hub", "ann/dev", data_file, "--terms-sha", sha[:12])[0] == 2
    assert "/no/such/model" in capsys.readouterr().err


def test_a_missing_or_refused_token_and_a_wrong_namespace_before_the_model_loads(tmp_path, data_file, capsys,
                                                                                monkeypatch):  # fmt: skip
    tokens = {u: secrets.token_hex(16) for u in ("coord", "ann")}
    with HubServer(tmp_path / "root", tokens=tokens) as server:
        create_collaboration(HfHub(server.endpoint, token=tokens["coord"], namespace="coord"), "coord/c", TERMS)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        code, seconds = _peer(server.endpoint, "ann/dev", data_file, collab="coord/c")
        line = _error(capsys)
        assert code == 2 and "$HF_TOKEN is not set" in line and seconds < FAST, line
        monkeypatch.setenv("HF_TOKEN", "x" * 32)
        code, seconds = _peer(server.endpoint, "ann/dev", data_file, collab="coord/c")
        line = _error(capsys)
        assert code == 2 and "refused the credentials" in line and "HF_TOKEN" in line and seconds < FAST, line
        monkeypatch.setenv("HF_TOKEN", tokens["ann"])
        code, seconds = _peer(server.endpoint, "ben/dev", data_file, collab="coord/c")
        line = _error(capsys)
        assert code == 2 and "ben/dev" in line and "namespace" in line and seconds < FAST, line
        # collab create in another user's namespace: refused before the base is fingerprinted (a model load)
        terms = tmp_path / "terms.json"
        terms.write_text(json.dumps({"base_model": TINY_BASE_ID, "max_members": 2}))
        started = time.monotonic()
        code = main(["collab", "create", "--hub", server.endpoint, "--collab", "coord/other", "--config", str(terms),
                     "--model", "/no/such/model"])  # fmt: skip
        line = _error(capsys)
        assert code == 2 and "coord/other" in line and "namespace" in line, line
        assert time.monotonic() - started < FAST


def test_collab_create_refuses_a_terms_typo_and_an_existing_id_before_any_model_load(tmp_path, capsys):
    hub = str(tmp_path / "hub")
    terms = tmp_path / "terms.json"
    terms.write_text(json.dumps({"base_model": TINY_BASE_ID, "roundz": 3}))
    args = ["collab", "create", "--hub", hub, "--collab", "lab/c", "--config", str(terms), "--model", "/no/such/model"]
    assert main(args) == 2
    assert "unknown terms ['roundz']" in _error(capsys)
    create_collaboration(LocalHub(hub, namespace="lab"), "lab/c", TERMS)
    terms.write_text(json.dumps({"base_model": TINY_BASE_ID, "rounds": 3}))
    assert main(args) == 2
    assert "lab/c exists already" in _error(capsys)


def test_collab_terms_lists_every_term(capsys):
    import dataclasses

    assert main(["collab", "terms"]) == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(CollabTerms):
        assert f"  {f.name} (" in text, f.name
    assert "test_share (float; default 0.1)" in text


def test_a_second_copy_of_a_running_peer_id_is_refused_within_seconds(tmp_path, data_file, capsys):
    hub_dir = tmp_path / "hub"
    hub = LocalHub(hub_dir, namespace="lab")
    create_collaboration(hub, "lab/c", TERMS)
    first_state = tmp_path / "state-1"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "sorlora", "peer", "--hub", str(hub_dir), "--collab", "lab/c",
                              "--peer-id", "ann/dev", "--data", data_file, "--state-dir", str(first_state),
                              "--no-progress", "--threads", "1", "--poll-interval", "0.2", "--max-seconds", "120"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "members/ann/dev.json" not in hub.list_files("lab/c"):  # registered: it waits for a second member
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-2000:]
            time.sleep(0.2)
        # the same state directory (a second terminal running the same command)
        code, seconds = _peer(hub_dir, "ann/dev", data_file, "--state-dir", str(first_state))
        line = _error(capsys)
        assert code == 2 and "another copy is running with state directory" in line and seconds < FAST, line
        # another state directory (another machine): the first copy's claim in the collaboration repo stops it
        code, seconds = _peer(hub_dir, "ann/dev", data_file, "--state-dir", str(tmp_path / "state-2"))
        line = _error(capsys)
        assert code == 2 and "ann/dev is already running in lab/c from another state directory" in line, line
        assert f"pid {first.pid}" in line and seconds < FAST
        assert first.poll() is None, "the first copy runs on"
    finally:
        first.kill()
        first.wait(timeout=30)
    # killed, its lock is gone with it and its own state directory resumes it: the same claimant (then the missing
    # model is what stops this test's copy)
    assert _peer(hub_dir, "ann/dev", data_file, "--state-dir", str(first_state))[0] == 2
    assert "/no/such/model" in capsys.readouterr().err
