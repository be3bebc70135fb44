"""hub-serve's Hub-like authorization over real HTTP: per-user tokens, namespaces, collaboration repos, private reads."""

from __future__ import annotations

import argparse
import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from sorlora_gossip import Peer
from sorlora_gossip.cli import add_gossip_commands
from sorlora_gossip.hub import HfHub, HubAuthError, HubForbidden, HubServer, RepoNotFound, load_tokens
from sorlora_gossip.layout import COLLAB_FILE, PLAN_FILE, member_path

from .conftest import FAST_BACKOFF
from .gossip_payloads import calibrated_mlp, update_for_round

TOKENS = {"alice": "hf_alice_0123456789abcdef", "bob": "hf_bob_0123456789abcdef00", "carol": "hf_carol_0123456789abcd"}


@pytest.fixture
def server(tmp_path):
    with HubServer(tmp_path / "srv", tokens=TOKENS) as srv:
        yield srv


def client(server, tmp_path, user: str | None) -> HfHub:
    token = TOKENS[user] if user else None
    return HfHub(server.endpoint, token=token, namespace=user or "alice", cache_dir=tmp_path / f"c-{user}",
                 **FAST_BACKOFF)  # fmt: skip


def test_whoami_gives_the_token_user_and_the_default_namespace(server, tmp_path):
    hub = HfHub(server.endpoint, token=TOKENS["bob"], cache_dir=tmp_path / "c")
    assert hub.namespace == "bob"
    assert hub.repo_id("peer") == "bob/peer"
    assert hub.repo_id("alice/peer") == "alice/peer", "a full repo id is kept as is"
    with pytest.raises(HubAuthError):
        HfHub(server.endpoint, token="hf_not_a_known_token_000", cache_dir=tmp_path / "d").namespace  # noqa: B018


def test_a_user_cannot_write_tag_or_delete_in_another_users_repo(server, tmp_path):
    alice, bob = client(server, tmp_path, "alice"), client(server, tmp_path, "bob")
    repo = "alice/p"
    alice.create_repo(repo)
    head = alice.create_commit(repo, {"a.txt": b"alice"}, commit_message="mine")
    alice.create_tag(repo, "round-0000")
    for attempt in (
        lambda: bob.create_commit(repo, {"a.txt": b"bob"}, commit_message="forged"),
        lambda: bob.create_tag(repo, "round-0001", revision=head),
        lambda: bob.delete_tag(repo, "round-0000"),
        lambda: bob.create_repo("alice/other"),
        lambda: bob._api.delete_repo(repo),
        lambda: bob._api.create_branch(repo, branch="forged"),
    ):
        with pytest.raises(Exception) as denied:
            attempt()
        status = getattr(getattr(denied.value, "response", None), "status_code", None)
        assert isinstance(denied.value, HubForbidden) or status == 403, repr(denied.value)
    assert alice.resolve(repo) == head and alice.read_bytes(repo, "a.txt", revision="main") == b"alice"
    assert alice.list_refs(repo).tags == {"round-0000": head}
    alice.delete_tag(repo, "round-0000")  # the owner may
    assert alice.list_refs(repo).tags == {}


def test_anonymous_clients_cannot_write_anything(server, tmp_path):
    alice, anonymous = client(server, tmp_path, "alice"), client(server, tmp_path, None)
    alice.create_repo("alice/p")
    head = alice.create_commit("alice/p", {"a.txt": b"1"}, commit_message="one")
    for attempt in (
        lambda: anonymous.create_repo("alice/q"),
        lambda: anonymous.create_commit("alice/p", {"a.txt": b"2"}, commit_message="anon"),
        lambda: anonymous.create_tag("alice/p", "t1"),
        lambda: anonymous.delete_tag("alice/p", "t1"),
    ):
        with pytest.raises(HubAuthError) as denied:
            attempt()
        assert not isinstance(denied.value, HubForbidden) and "401" in str(denied.value.__cause__)
    assert anonymous.read_bytes("alice/p", "a.txt", revision=head) == b"1", "public reads stay anonymous"
    assert alice.resolve("alice/p") == head


def test_private_repos_are_read_by_their_owner_only(server, tmp_path):
    alice, bob, anonymous = (client(server, tmp_path, u) for u in ("alice", "bob", None))
    alice.create_repo("alice/secret", private=True)
    alice.create_commit("alice/secret", {"s.txt": b"x"}, commit_message="s")
    assert alice.read_bytes("alice/secret", "s.txt", revision="main") == b"x"
    with pytest.raises(HubAuthError):
        anonymous.resolve("alice/secret")
    with pytest.raises(RepoNotFound):
        bob.resolve("alice/secret")
    assert "alice/secret" not in bob.list_repos("alice") and "alice/secret" in alice.list_repos("alice")


def test_the_token_is_checked_before_the_body_is_read(server):
    host, port = server.endpoint.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /api/models/alice/p/commit/main HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/x-ndjson\r\nContent-Length: 209715200\r\n\r\n")  # fmt: skip
        start = time.monotonic()
        answer = conn.recv(4096)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:80]
    assert time.monotonic() - start < 5, "answered without waiting for 200 MiB of body"


def test_oversized_bodies_are_refused_before_reading(tmp_path):
    with HubServer(tmp_path / "srv", tokens=TOKENS, max_body_bytes=1 << 16) as srv:
        alice = client(srv, tmp_path, "alice")
        alice.create_repo("alice/p")
        alice.create_commit("alice/p", {"small": b"x" * 1000}, commit_message="fits")
        with pytest.raises(Exception) as refused:
            alice.create_commit("alice/p", {"big": b"x" * (1 << 17)}, commit_message="too big")
        assert "413" in repr(refused.value) + repr(refused.value.__cause__)
        assert alice.list_files("alice/p") == ["small"]


def test_collaboration_repo_members_write_their_own_files_and_the_plan_once(server, tmp_path):
    alice, bob, carol = (client(server, tmp_path, u) for u in ("alice", "bob", "carol"))
    collab = "alice/study"
    alice.create_repo(collab)
    alice.create_commit(collab, {COLLAB_FILE: json.dumps({"admitted": ["alice", "bob"]}).encode()},
                        commit_message="terms")  # fmt: skip
    bob.create_commit(collab, {member_path("bob", "bob/p0"): b"{}"}, commit_message="join")
    with pytest.raises(HubForbidden):
        bob.create_commit(collab, {member_path("alice", "alice/p0"): b"{}"}, commit_message="impersonate")
    with pytest.raises(HubForbidden):
        bob.create_commit(collab, {COLLAB_FILE: b'{"admitted": null}'}, commit_message="rewrite terms")
    with pytest.raises(HubForbidden):
        carol.create_commit(collab, {member_path("carol", "carol/p0"): b"{}"}, commit_message="not admitted")
    with pytest.raises(HubForbidden):
        bob.create_tag(collab, "round-0000")
    bob.create_commit(collab, {PLAN_FILE: b'{"plan": 1}'}, commit_message="plan")
    with pytest.raises(HubForbidden):
        bob.create_commit(collab, {PLAN_FILE: b'{"plan": 2}'}, commit_message="replan")
    assert alice.read_bytes(collab, PLAN_FILE, revision="main") == b'{"plan": 1}'
    assert alice.list_files(collab) == [COLLAB_FILE, member_path("bob", "bob/p0"), PLAN_FILE]


def test_open_collaboration_admits_any_authenticated_user(server, tmp_path):
    alice, carol, anonymous = (client(server, tmp_path, u) for u in ("alice", "carol", None))
    alice.create_repo("alice/open")
    alice.create_commit("alice/open", {COLLAB_FILE: b'{"admitted": null}'}, commit_message="terms")
    carol.create_commit("alice/open", {member_path("carol", "p"): b"{}"}, commit_message="join")
    with pytest.raises(HubAuthError):
        anonymous.create_commit("alice/open", {member_path("anon", "p"): b"{}"}, commit_message="join")


def test_peers_in_different_namespaces_gossip_with_full_repo_ids(server, tmp_path):
    hubs = {u: client(server, tmp_path, u) for u in ("alice", "bob")}
    models = {u: calibrated_mlp(slot=i, seed=i) for i, u in enumerate(hubs)}
    peers = {u: Peer(hubs[u], "p") for u in hubs}
    assert peers["alice"].repo_id == "alice/p" and peers["bob"].repo_id == "bob/p"
    for r in range(2):
        for i, u in enumerate(peers):
            peers[u].push_round(r, update_for_round(models[u], r, seed=i))
        pull = peers["bob"].pull_round(r, ["alice/p", "bob/p"], timeout=5)
        assert pull.complete and list(pull.updates) == ["alice/p"], (pull.rejected, pull.skipped)
        assert pull.revisions["alice/p"] == hubs["alice"].resolve("alice/p", f"round-{r:04d}")
    named = Peer(hubs["alice"], "alice/p2")  # a full id as the peer's own identity
    assert named.repo_id == "alice/p2"
    named.push_round(0, update_for_round(models["alice"], 0, seed=0))
    assert list(peers["bob"].pull_round(0, ["alice/p2"], timeout=5).updates) == ["alice/p2"]


def test_a_refusing_neighbour_does_not_abort_the_pull(server, tmp_path):
    alice, bob = client(server, tmp_path, "alice"), client(server, tmp_path, "bob")
    alice.create_repo("alice/hidden", private=True)
    model = calibrated_mlp(slot=1, seed=1)
    Peer(alice, "open").push_round(0, update_for_round(model, 0, seed=1))
    pull = Peer(bob, "me").pull_round(0, ["alice/open", "alice/hidden", "../bad"], timeout=0.5)
    assert list(pull.updates) == ["alice/open"]
    assert set(pull.rejected) | set(pull.skipped) == {"alice/hidden", "../bad"}


def test_tokens_file_and_non_loopback_refusal(tmp_path, capsys):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(TOKENS))
    assert load_tokens(path) == TOKENS
    path.write_text(json.dumps({"alice": "short"}))
    with pytest.raises(ValueError, match="at least 16") as bad:
        load_tokens(path)
    assert "short" not in str(bad.value), "a token is never echoed"
    with pytest.raises(ValueError, match="without tokens"):
        HubServer(tmp_path / "srv", host="0.0.0.0")
    parser = argparse.ArgumentParser()
    add_gossip_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["hub-serve", "--root", str(tmp_path / "srv"), "--host", "0.0.0.0", "--port", "0"])
    assert args.func(args) == 2 and "without tokens" in capsys.readouterr().err


def test_anonymous_raw_requests_get_401_and_unknown_tokens_too(server):
    request = urllib.request.Request(server.endpoint + "/api/repos/create", data=b'{"name": "x"}', method="POST")
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(request, timeout=10)
    request.add_header("Authorization", "Bearer hf_guess_0123456789abcdef")
    with pytest.raises(urllib.error.HTTPError) as guessed:
        urllib.request.urlopen(request, timeout=10)
    assert anonymous.value.code == guessed.value.code == 401
    assert str(server.hub.root) not in anonymous.value.read().decode()
