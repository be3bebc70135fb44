"""Commit authors and file ids, the hub facts admission is judged by: both backends give every file's git blob id
without downloading it, and ``hub-serve`` with tokens records the authenticated user as a commit's author (read
back through ``huggingface_hub``'s ``list_repo_commits``); an open hub records none, and no client can choose them."""

from __future__ import annotations

from sorlora_gossip import HfHub
from sorlora_gossip.hub import HubServer
from sorlora_gossip.hub.local import git_blob_oid


def test_file_ids_are_git_blob_ids_and_change_with_the_content(hub):
    repo = hub.repo_id("ids")
    hub.create_repo(repo)
    first = hub.create_commit(repo, {"a.json": b"1", "b/c.bin": b"\0" * 10}, commit_message="one")
    second = hub.create_commit(repo, {"a.json": b"2"}, commit_message="two")
    assert hub.file_ids(repo, revision=first) == {"a.json": git_blob_oid(b"1"), "b/c.bin": git_blob_oid(b"\0" * 10)}
    ids = hub.file_ids(repo, revision=second)
    assert ids["a.json"] == git_blob_oid(b"2") and ids["b/c.bin"] == git_blob_oid(b"\0" * 10)


def test_hub_serve_records_the_token_s_user_as_the_author(tmp_path, hf_hub):
    tokens = {"alice": "a" * 20, "coord": "c" * 20}
    with HubServer(tmp_path / "srv", tokens=tokens) as server:
        alice, coord = (HfHub(server.endpoint, token=tokens[u], namespace=u, cache_dir=tmp_path / u, backoff=0.01)
                        for u in ("alice", "coord"))  # fmt: skip
        coord.create_repo("coord/c")
        coord.create_commit("coord/c", {"collab.json": b"{}"}, commit_message="by coord")
        alice.create_repo("alice/p")
        alice.create_commit("alice/p", {"x": b"1"}, commit_message="alice/p: round-0000 (says anyone)")
        assert [c.authors for c in alice.list_commits("alice/p")] == [("alice",), ()], "the initial commit: none"
        assert coord.list_commits("coord/c")[0].authors == ("coord",)
        assert server.hub.list_commits("alice/p")[0].authors == ("alice",), "stored with the commit"
    # an open hub (no tokens) authenticates nobody: no authors
    repo = hf_hub.repo_id("open")
    hf_hub.create_repo(repo)
    hf_hub.create_commit(repo, {"x": b"1"}, commit_message="anyone")
    assert hf_hub.list_commits(repo)[0].authors == ()
