"""Faults: push conflicts, 429/5xx, late neighbours, bad payloads, crashes mid-round, path escapes, tokens, pickles."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from safetensors.torch import save as save_safetensors

from peft_sorlora import get_sparse_update
from sorlora_gossip import Peer, round_tag
from sorlora_gossip.hub import (
    HfHub,
    HubAuthError,
    HubServer,
    HubUnavailable,
    LocalHub,
    PushConflictError,
    RevisionNotFound,
)
from sorlora_gossip.peer import INFO_FILE, UPDATE_FILE

from .gossip_payloads import calibrated_mlp, update_for_round

# -- push conflicts ---------------------------------------------------------------------------------------------


def test_push_conflict_rereads_head_and_retries_without_losing_either_update(hub, new_hub, hub_server_or_none):
    model = calibrated_mlp()
    peer = Peer(hub, "busy")
    peer.push_round(0, update_for_round(model, 0, seed=0))
    other_writer = new_hub()  # e.g. a model-card writer committing to the same repo meanwhile
    card = other_writer.create_commit(peer.repo_id, {"README.md": b"# busy\n"}, commit_message="card")
    result = peer.push_round(1, update_for_round(model, 1, seed=0))  # its parent (round 0) is stale now
    history = [c.message for c in hub.list_commits(peer.repo_id)]
    assert history == ["busy: round-0001", "card", "busy: round-0000", "initial commit"]
    assert hub.read_bytes(peer.repo_id, "README.md", revision=result.sha) == b"# busy\n", "the other update is kept"
    assert hub.resolve(peer.repo_id, round_tag(1)) == result.sha != card
    if hub_server_or_none is not None:
        commits = [p for m, p in hub_server_or_none.requests if m == "POST" and p.endswith("/commit/main")]
        assert len(commits) == 4, "round 0, card, rejected stale round 1, retried round 1"


@pytest.fixture
def hub_server_or_none(hub, request):
    return request.getfixturevalue("hub_server") if isinstance(hub, HfHub) else None


def test_concurrent_writers_to_one_repo_all_land(hub, new_hub):
    repo = hub.repo_id("shared")
    hub.create_repo(repo)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        client = new_hub()
        try:
            for _ in range(50):
                try:
                    parent = client.resolve(repo)
                    client.create_commit(
                        repo, {f"w{i}.txt": str(i).encode()}, commit_message=f"w{i}", parent_commit=parent
                    )
                    return
                except PushConflictError:
                    continue
            raise AssertionError(f"writer {i} never landed")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert hub.list_files(repo) == [f"w{i}.txt" for i in range(6)], "no update lost"
    assert sorted(c.message for c in hub.list_commits(repo)) == ["initial commit"] + [f"w{i}" for i in range(6)]


# -- 429 / 5xx from a Hub endpoint ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_transient_http_errors_are_retried_with_backoff(hf_hub, hub_server, status):
    repo = hf_hub.repo_id("flaky")
    hf_hub.create_repo(repo)
    hub_server.inject_fault(2, status, method="POST", path_contains="/commit/")
    before = len(hub_server.requests)
    sha = hf_hub.create_commit(repo, {"a": b"1"}, commit_message="through faults")
    commits = [p for m, p in hub_server.requests[before:] if m == "POST" and "/commit/" in p]
    assert len(commits) == 3, "two failures, then success"
    assert hf_hub.resolve(repo) == sha and len(hf_hub.list_commits(repo)) == 2, "exactly one commit landed"
    hub_server.inject_fault(2, status, method="HEAD", path_contains="/resolve/")
    assert hf_hub.read_bytes(repo, "a", revision=sha) == b"1", "downloads retry too"
    hub_server.inject_fault(1, status, method="GET", path_contains="/revision/", retry_after=0.01)
    assert hf_hub.resolve(repo, sha) == sha


def test_persistent_http_errors_give_up_after_bounded_retries(hub_server, tmp_path):
    hub = HfHub(hub_server.endpoint, namespace="gossip", cache_dir=tmp_path / "c", max_retries=3, backoff=0.01)
    hub.create_repo(hub.repo_id("down"))
    hub_server.inject_fault(100, 503, path_contains="/api/models/gossip/down")
    before = len(hub_server.requests)
    start = time.monotonic()
    with pytest.raises(HubUnavailable, match="after 4 attempts"):
        hub.resolve(hub.repo_id("down"))
    assert len(hub_server.requests) - before == 4
    assert time.monotonic() - start < 5


# -- late neighbours --------------------------------------------------------------------------------------------


def test_neighbour_missing_at_timeout_is_skipped_and_recorded(hub):
    models = {p: calibrated_mlp(slot=i, seed=i) for i, p in enumerate(["a", "b", "c"])}
    peers = {p: Peer(hub, p) for p in models}
    for i, p in enumerate(peers):
        peers[p].push_round(0, update_for_round(models[p], 0, seed=i))
    peers["b"].push_round(1, update_for_round(models["b"], 1, seed=1))  # c never pushes round 1
    start = time.monotonic()
    pull = peers["a"].pull_round(1, ["b", "c"], timeout=0.6, poll_interval=0.05)
    assert 0.6 <= time.monotonic() - start < 5
    assert list(pull.updates) == ["b"] and list(pull.skipped) == ["c"] and not pull.rejected
    assert "round-0001 not pushed within 0.6s" in pull.skipped["c"]
    peers["a"].push_round(1, update_for_round(models["a"], 1, seed=0))
    info = json.loads(hub.read_bytes(hub.repo_id("a"), INFO_FILE, revision=round_tag(1)))
    assert list(info["previous_pull"]["skipped"]) == ["c"], "the skip is recorded on the hub"


def test_late_neighbour_within_timeout_is_waited_for(hub):
    models = {p: calibrated_mlp(slot=i, seed=i) for i, p in enumerate(["a", "late"])}
    peers = {p: Peer(hub, p) for p in models}
    peers["late"].push_round(0, update_for_round(models["late"], 0, seed=1))
    timer = threading.Timer(0.4, peers["late"].push_round, (1, update_for_round(models["late"], 1, seed=1)))
    timer.start()
    pull = peers["a"].pull_round(1, ["late"], timeout=20, poll_interval=0.05)
    timer.join()
    assert pull.complete and list(pull.updates) == ["late"]


# -- bad payloads -----------------------------------------------------------------------------------------------


class _Exploit:
    """Unpickling this would create a marker file: it proves nothing is ever unpickled."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _bad_payload(kind: str, good: bytes, model, tmp_path) -> bytes:
    if kind == "corrupted":
        return good[:8] + b"\x00" * 40 + good[48:]
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "nan":
        update = update_for_round(model, 1, seed=0)
        key = next(iter(update.values))
        update.values[key][0] = float("nan")
        return update.to_bytes()
    if kind == "inf":
        update = update_for_round(model, 1, seed=0)
        update.values[next(iter(update.values))][-1] = float("inf")
        return update.to_bytes()
    if kind == "wrong_shape":
        update = update_for_round(model, 1, seed=0)
        key = next(iter(update.values))
        update.values[key] = torch.cat([update.values[key], torch.zeros(3)])
        return update.to_bytes()
    if kind == "wrong_base_model":
        return update_for_round(calibrated_mlp(base_model="other/base"), 1, seed=0).to_bytes()
    if kind == "wrong_config":
        return update_for_round(calibrated_mlp(r=2), 1, seed=0).to_bytes()
    if kind == "foreign_safetensors":
        return save_safetensors({"weight": torch.ones(3)})
    if kind == "pickle":
        _Exploit.marker = tmp_path / "UNPICKLED"
        return pickle.dumps(_Exploit())
    raise ValueError(kind)


REASONS = {
    "corrupted": "not JSON|not valid safetensors|foreign",
    "truncated": "truncated|not valid safetensors",
    "nan": "NaN or Inf",
    "inf": "NaN or Inf",
    "wrong_shape": "values for a mask",
    "wrong_base_model": "base model 'other/base'",
    "wrong_config": "config hash",
    "foreign_safetensors": "foreign payload",
    "pickle": "payload truncated|not JSON|foreign|too short",
}


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_bad_payload_is_rejected_naming_peer_and_revision_and_the_peer_carries_on(hub, kind, tmp_path):
    models = {p: calibrated_mlp(slot=i, seed=i) for i, p in enumerate(["me", "good", "bad"])}
    peers = {p: Peer(hub, p) for p in models}
    for i, p in enumerate(peers):
        peers[p].push_round(0, update_for_round(models[p], 0, seed=i))
    peers["good"].push_round(1, update_for_round(models["good"], 1, seed=1))
    # "bad" publishes a round-1 revision whose peer.json is consistent with the bad bytes (checksum passes)
    payload = _bad_payload(kind, update_for_round(models["bad"], 1, seed=2).to_bytes(), models["bad"], tmp_path)
    repo = hub.repo_id("bad")
    info = json.loads(hub.read_bytes(repo, INFO_FILE, revision=round_tag(0)))
    info.update(round=1, bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    sha = hub.create_commit(repo, {UPDATE_FILE: payload, INFO_FILE: json.dumps(info).encode()}, commit_message="bad")
    hub.create_tag(repo, round_tag(1), revision=sha)

    pull = peers["me"].pull_round(1, ["good", "bad"], timeout=5)
    assert list(pull.updates) == ["good"] and not pull.skipped
    rejection = pull.rejected["bad"]
    assert (rejection.peer, rejection.revision) == ("bad", sha)
    assert "'bad'" in str(rejection) and sha in str(rejection)
    assert re.search(REASONS[kind], rejection.reason), rejection.reason
    if kind == "pickle":
        assert not (tmp_path / "UNPICKLED").exists(), "the pickle was never loaded"
    peers["me"].push_round(1, update_for_round(models["me"], 1, seed=0))
    peers["good"].push_round(2, update_for_round(models["good"], 2, seed=1))
    assert list(peers["me"].pull_round(2, ["good"], timeout=5).updates) == ["good"], "the peer carries on"


def test_payload_not_matching_its_checksum_is_rejected(hub):
    models = {p: calibrated_mlp(slot=i, seed=i) for i, p in enumerate(["me", "flipper"])}
    peers = {p: Peer(hub, p) for p in models}
    for i, p in enumerate(peers):
        peers[p].push_round(0, update_for_round(models[p], 0, seed=i))
    repo = hub.repo_id("flipper")
    good = update_for_round(models["flipper"], 1, seed=1).to_bytes()
    info = json.loads(hub.read_bytes(repo, INFO_FILE, revision=round_tag(0)))
    info.update(round=1, bytes=len(good), sha256=hashlib.sha256(good).hexdigest())
    flipped = good[:-4] + bytes(b ^ 0xFF for b in good[-4:])  # bit rot in the values: still valid safetensors
    sha = hub.create_commit(repo, {UPDATE_FILE: flipped, INFO_FILE: json.dumps(info).encode()}, commit_message="rot")
    hub.create_tag(repo, round_tag(1), revision=sha)
    pull = peers["me"].pull_round(1, ["flipper"], timeout=5)
    assert "corrupted or truncated" in pull.rejected["flipper"].reason


@pytest.mark.parametrize("content", [b"not json", b'{"format": "x"}', b'{"format": "sorlora-peer/1", "peer_id": "x"}'])
def test_bad_peer_json_is_rejected(hub, content):
    model = calibrated_mlp(slot=1, seed=1)
    Peer(hub, "src").push_round(0, update_for_round(model, 0, seed=1))
    repo = hub.repo_id("src")
    sha = hub.create_commit(repo, {INFO_FILE: content}, commit_message="bad info")
    hub.create_tag(repo, round_tag(1), revision=sha)
    pull = Peer(hub, "me").pull_round(1, ["src"], timeout=5)
    assert pull.rejected["src"].revision == sha and "peer.json" in pull.rejected["src"].reason


# -- crash mid-round and resume ---------------------------------------------------------------------------------


class _Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing catches it."""


class _CrashBeforeTag:
    """A hub whose create_tag 'kills the process' (the commit has landed, the tag not yet)."""

    def __init__(self, hub):
        self._hub = hub

    def __getattr__(self, name):
        return getattr(self._hub, name)

    def create_tag(self, *args, **kwargs):
        raise _Crash()


def test_peer_crashing_between_commit_and_tag_resumes_without_loss_or_duplicate(hub, new_hub):
    model = calibrated_mlp()
    peer = Peer(hub, "phoenix")
    for r in range(2):
        peer.push_round(r, update_for_round(model, r, seed=0))
    crashing = Peer(_CrashBeforeTag(new_hub()), "phoenix")
    with pytest.raises(_Crash):
        crashing.push_round(2, update_for_round(model, 2, seed=0))
    with pytest.raises(RevisionNotFound):
        hub.resolve(peer.repo_id, round_tag(2))

    resumed = Peer(new_hub(), "phoenix")  # a fresh process: only the hub remembers
    assert resumed.last_pushed_round() == 2
    assert hub.resolve(peer.repo_id, round_tag(2)) == hub.resolve(peer.repo_id), "the missing tag was repaired"
    again = resumed.push_round(2, update_for_round(model, 2, seed=0))
    assert not again.created
    resumed.push_round(3, update_for_round(model, 3, seed=0))
    messages = [c.message for c in hub.list_commits(peer.repo_id)]
    assert messages == [f"phoenix: round-{r:04d}" for r in (3, 2, 1, 0)] + ["initial commit"]
    assert sorted(hub.list_refs(peer.repo_id).tags) == [round_tag(r) for r in range(4)]


def test_peer_whose_tag_push_fails_on_the_endpoint_resumes(hf_hub, hub_server):
    model = calibrated_mlp()
    Peer(hf_hub, "flaky").push_round(0, update_for_round(model, 0, seed=0))
    hub_server.inject_fault(100, 503, method="POST", path_contains="/tag/")
    with pytest.raises(HubUnavailable):
        Peer(hf_hub, "flaky").push_round(1, update_for_round(model, 1, seed=0))
    hub_server.clear_faults()
    resumed = Peer(hf_hub, "flaky")
    assert resumed.last_pushed_round() == 1
    assert not resumed.push_round(1, update_for_round(model, 1, seed=0)).created
    assert len(hf_hub.list_commits(hf_hub.repo_id("flaky"))) == 3


def test_local_hub_process_killed_mid_push_leaves_no_visible_partial_revision(tmp_path):
    root = tmp_path / "hub"
    hub = LocalHub(root)
    repo = hub.repo_id("killed")
    hub.create_repo(repo)
    head = hub.create_commit(repo, {"a": b"before"}, commit_message="before")
    script = textwrap.dedent(f"""
        import os
        from sorlora_gossip.hub import local
        real = os.replace
        def dying_replace(src, dst):
            if str(dst).endswith("refs.json"):
                os._exit(17)  # the process dies after blobs and commit object are written, before the ref moves
            real(src, dst)
        local.os.replace = dying_replace
        local.LocalHub({str(root)!r}).create_commit("gossip/killed", {{"a": b"after", "b": b"new"}},
                                                   commit_message="never visible")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == 17, proc.stderr.decode()
    assert hub.resolve(repo) == head
    assert hub.read_bytes(repo, "a", revision="main") == b"before"
    assert [c.message for c in hub.list_commits(repo)] == ["before", "initial commit"]
    assert hub.create_commit(repo, {"a": b"after"}, commit_message="after", parent_commit=head) != head


# -- names, tokens --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/repos/create", {"name": "..", "organization": "gossip"}),
        ("POST", "/api/repos/create", {"name": "x", "organization": "../../etc"}),
        ("GET", "/api/models/gossip/%2E%2E/revision/main", None),
        ("GET", "/gossip/x/resolve/main/..%2F..%2Fsecret", None),
        ("POST", "/api/models/gossip/x/tag/main", {"tag": "../../refs"}),
    ],
)
def test_server_refuses_escaping_names_sent_by_any_client(hub_server, method, path, body):
    hub_server.hub.create_repo("gossip/x")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(hub_server.endpoint + path, data=data, method=method)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code in (400, 404)
    assert sorted(p.name for p in (hub_server.hub.root / "repos").rglob("refs.json")) == ["refs.json"]
    assert hub_server.hub.list_repos() == ["gossip/x"]


def test_token_is_sent_but_never_logged_or_shown(tmp_path, caplog):
    token = "hf_SeCrEtToKeN0123456789abcdef"
    caplog.set_level(logging.DEBUG)
    with HubServer(tmp_path / "srv", token=token, private=True) as server:
        hub = HfHub(server.endpoint, token=token, namespace="gossip", cache_dir=tmp_path / "c", backoff=0.01)
        model = calibrated_mlp()
        peer = Peer(hub, "quiet")
        peer.push_round(0, update_for_round(model, 0, seed=0))
        assert Peer(hub, "listener").pull_round(0, ["quiet", "absent"], timeout=0.2).updates.keys() == {"quiet"}
        server.inject_fault(1, 503, method="POST")
        peer.push_round(1, get_sparse_update(model, round=1))
        intruder = HfHub(server.endpoint, token="hf_wrong", namespace="gossip", cache_dir=tmp_path / "d")
        with pytest.raises(HubAuthError) as denied:
            intruder.create_repo(intruder.repo_id("intrusion"))
    shown = caplog.text + repr(hub) + str(denied.value) + repr(denied.value.__cause__)
    assert token not in shown and "SeCrEt" not in shown
    assert "***" in repr(hub)


def test_last_pushed_round_before_the_first_push_then_push(hub):
    model = calibrated_mlp()
    peer = Peer(hub, "fresh")
    assert peer.last_pushed_round() is None, "no repo yet"
    assert peer.push_round(0, update_for_round(model, 0, seed=0)).created, "the push still creates the repo"
    assert Peer(hub, "fresh").last_pushed_round() == 0


def test_a_dead_endpoint_gives_project_errors_within_seconds(tmp_path):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    dead = HfHub(f"http://127.0.0.1:{port}", namespace="gossip", cache_dir=tmp_path / "c", backoff=0.05)
    model = calibrated_mlp()
    for call in (
        lambda: dead.create_repo("gossip/x"),
        lambda: dead.create_commit("gossip/x", {"a": b"1"}, commit_message="m"),
        lambda: Peer(dead, "x").push_round(0, update_for_round(model, 0, seed=0)),
    ):
        start = time.monotonic()
        with pytest.raises(HubUnavailable) as failed:
            call()
        assert time.monotonic() - start < 10, "no stacked retry policies"
        assert f"127.0.0.1:{port}" in str(failed.value)
