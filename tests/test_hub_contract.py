"""One contract for every hub backend: LocalHub (a folder), HfHub (real huggingface_hub over HTTP) to HubServer, and
HfHub to a minimal Hub-compatible server lacking the optional endpoints (``/api/validate-yaml``, repo listing)."""

from __future__ import annotations

import argparse
import logging
import re

import pytest

from sorlora_gossip import Peer
from sorlora_gossip.cards import AdapterCards
from sorlora_gossip.cli import add_gossip_commands
from sorlora_gossip.hub import (
    EndpointNotSupported,
    EntryNotFound,
    HfHub,
    HubServer,
    InvalidNameError,
    PushConflictError,
    RefExistsError,
    RepoNotFound,
    RevisionNotFound,
)
from sorlora_gossip.layout import CARD_FILE

from .conftest import FAST_BACKOFF
from .gossip_payloads import calibrated_mlp, update_for_round

SHA = re.compile(r"[0-9a-f]{40}")
BINARY = bytes(range(256)) * 4


@pytest.fixture
def minimal_server(tmp_path):
    """A Hub-compatible server without the optional endpoints (validate-yaml, repo listing)."""
    with HubServer(tmp_path / "minimal-root", minimal=True) as server:
        yield server


@pytest.fixture
def minimal_hub(minimal_server, tmp_path):
    return HfHub(minimal_server.endpoint, namespace="gossip", cache_dir=tmp_path / "minimal-cache", **FAST_BACKOFF)


@pytest.fixture(params=["local", "hf", "minimal"])
def hub(request):
    """Every backend in turn (overrides conftest's two): LocalHub, HfHub to HubServer, HfHub to a minimal server."""
    return request.getfixturevalue(f"{request.param}_hub")


def _listed(hub, namespace=None):
    """``hub.list_repos``, or None where the endpoint cannot list (an optional part of the Hub API)."""
    try:
        return hub.list_repos(namespace)
    except EndpointNotSupported:
        return None


def test_create_repo_is_idempotent_and_starts_with_one_commit(hub):
    repo = hub.repo_id("alice")
    assert repo == "gossip/alice"
    assert not hub.repo_exists(repo)
    hub.create_repo(repo)
    head = hub.resolve(repo)
    hub.create_repo(repo, exist_ok=True)
    assert hub.resolve(repo) == head, "re-creating must not touch the repo"
    assert SHA.fullmatch(head)
    assert [c.sha for c in hub.list_commits(repo)] == [head]
    assert hub.list_files(repo) == []
    with pytest.raises(RefExistsError):
        hub.create_repo(repo, exist_ok=False)
    assert _listed(hub) in ([repo], None), "listed exactly, where the endpoint lists repos at all"


def test_commit_adds_files_and_old_revisions_stay_immutable(hub):
    repo = hub.repo_id("bob")
    hub.create_repo(repo)
    first = hub.create_commit(repo, {"update.safetensors": BINARY, "peer.json": b"{}"}, commit_message="round 0")
    second = hub.create_commit(repo, {"peer.json": b'{"r": 1}', "sub/extra.txt": b"x"}, commit_message="round 1")
    assert SHA.fullmatch(first) and SHA.fullmatch(second) and first != second
    assert hub.resolve(repo) == second
    assert hub.list_files(repo, revision=first) == ["peer.json", "update.safetensors"]
    assert hub.list_files(repo, revision=second) == ["peer.json", "sub/extra.txt", "update.safetensors"]
    assert hub.read_bytes(repo, "peer.json", revision=first) == b"{}"
    assert hub.read_bytes(repo, "peer.json", revision=second) == b'{"r": 1}'
    assert hub.read_bytes(repo, "update.safetensors", revision=second) == BINARY, "unchanged files carry over"
    assert [c.message for c in hub.list_commits(repo)] == ["round 1", "round 0", "initial commit"]
    assert [c.sha for c in hub.list_commits(repo, revision=first)][0] == first


def test_local_file_paths_are_committed_by_content(hub, tmp_path):
    repo = hub.repo_id("carol")
    hub.create_repo(repo)
    source = tmp_path / "payload.bin"
    source.write_bytes(BINARY * 100)
    sha = hub.create_commit(repo, {"payload.bin": source}, commit_message="from a path")
    assert hub.read_bytes(repo, "payload.bin", revision=sha) == BINARY * 100


def test_stale_parent_commit_raises_push_conflict_and_changes_nothing(hub):
    repo = hub.repo_id("dave")
    hub.create_repo(repo)
    base = hub.resolve(repo)
    head = hub.create_commit(repo, {"a": b"1"}, commit_message="one", parent_commit=base)
    with pytest.raises(PushConflictError):
        hub.create_commit(repo, {"a": b"2"}, commit_message="stale", parent_commit=base)
    assert hub.resolve(repo) == head
    assert hub.read_bytes(repo, "a", revision="main") == b"1"
    assert hub.create_commit(repo, {"a": b"2"}, commit_message="fresh", parent_commit=head) != head


def test_identical_files_make_no_commit(hub):
    repo = hub.repo_id("erin")
    hub.create_repo(repo)
    head = hub.create_commit(repo, {"a": b"same"}, commit_message="one")
    assert hub.create_commit(repo, {"a": b"same"}, commit_message="again") == head
    assert len(hub.list_commits(repo)) == 2


def test_tags_resolve_to_their_commit_and_are_immutable(hub):
    repo = hub.repo_id("frank")
    hub.create_repo(repo)
    r0 = hub.create_commit(repo, {"a": b"0"}, commit_message="r0")
    hub.create_tag(repo, "round-0000", revision=r0)
    r1 = hub.create_commit(repo, {"a": b"1"}, commit_message="r1")
    hub.create_tag(repo, "round-0001")  # default: the branch head
    assert hub.resolve(repo, "round-0000") == r0
    assert hub.resolve(repo, "round-0001") == r1
    assert hub.resolve(repo, r0) == r0, "a full sha resolves to itself"
    with pytest.raises(RefExistsError):
        hub.create_tag(repo, "round-0000", revision=r1)
    hub.create_tag(repo, "round-0000", revision=r1, exist_ok=True)
    assert hub.resolve(repo, "round-0000") == r0, "exist_ok never moves a tag"
    refs = hub.list_refs(repo)
    assert refs.branches == {"main": r1}
    assert refs.tags == {"round-0000": r0, "round-0001": r1}
    assert hub.read_bytes(repo, "a", revision="round-0000") == b"0"


def test_missing_repo_revision_and_file_raise_project_errors(hub):
    repo = hub.repo_id("gina")
    with pytest.raises(RepoNotFound):
        hub.resolve(repo)
    with pytest.raises(RepoNotFound):
        hub.create_commit(repo, {"a": b"x"}, commit_message="nowhere")
    with pytest.raises(RepoNotFound):
        hub.list_refs(repo)
    hub.create_repo(repo)
    sha = hub.create_commit(repo, {"a": b"x"}, commit_message="one")
    with pytest.raises(RevisionNotFound):
        hub.resolve(repo, "round-0099")
    with pytest.raises(RevisionNotFound):
        hub.download(repo, "a", revision="round-0099")
    with pytest.raises(RevisionNotFound):
        hub.create_tag(repo, "t", revision="no-such-branch")
    with pytest.raises(EntryNotFound):
        hub.download(repo, "missing.bin", revision=sha)


@pytest.mark.parametrize("bad", ["../x", "/abs/x", "a/b/c", "a/..", "ns/..", "x", "ns/.hidden", "a b/c", ""])
def test_bad_repo_ids_are_refused(hub, bad):
    for call in (
        lambda: hub.create_repo(bad),
        lambda: hub.resolve(bad),
        lambda: hub.create_commit(bad, {"a": b"x"}, commit_message="m"),
        lambda: hub.download(bad, "a", revision="main"),
    ):
        with pytest.raises(InvalidNameError, match="invalid repo id"):
            call()


@pytest.mark.parametrize(
    "bad", ["../etc/passwd", "/etc/passwd", "a/../../b", "a//b", "./a", "a\\b", "C:/x", ".git/config"]
)
def test_bad_paths_are_refused_and_nothing_is_written(hub, bad):
    repo = hub.repo_id("hank")
    hub.create_repo(repo)
    head = hub.resolve(repo)
    with pytest.raises(InvalidNameError, match="invalid path"):
        hub.create_commit(repo, {bad: b"x", "ok.txt": b"y"}, commit_message="escape")
    with pytest.raises(InvalidNameError, match="invalid path"):
        hub.download(repo, bad, revision=head)
    assert hub.resolve(repo) == head


@pytest.mark.parametrize("bad", ["../main", "round 1", "a..b", "-x", "x.lock"])
def test_bad_tag_names_are_refused(hub, bad):
    repo = hub.repo_id("ivy")
    hub.create_repo(repo)
    with pytest.raises(InvalidNameError, match="invalid ref"):
        hub.create_tag(repo, bad)


def _transcript(hub) -> list:
    """A backend-independent record of a scenario: results and error types, with shas replaced by their order."""
    out: list = []
    repo = hub.repo_id("zed")
    shas: dict[str, int] = {}
    name = lambda sha: shas.setdefault(sha, len(shas))  # noqa: E731
    for step in (
        lambda: hub.create_repo(repo),
        lambda: name(hub.resolve(repo)),
        lambda: name(hub.create_commit(repo, {"u.bin": BINARY}, commit_message="r0")),
        lambda: hub.create_tag(repo, "round-0000"),
        lambda: name(hub.create_commit(repo, {"u.bin": b"v1"}, commit_message="r1", parent_commit="0" * 40)),
        lambda: name(hub.create_commit(repo, {"u.bin": b"v1", "i.json": b"{}"}, commit_message="r1")),
        lambda: hub.create_tag(repo, "round-0000"),
        lambda: name(hub.resolve(repo, "round-0000")),
        lambda: hub.read_bytes(repo, "u.bin", revision="round-0000") == BINARY,
        lambda: hub.list_files(repo),
        lambda: [(name(c.sha), c.message) for c in hub.list_commits(repo)],
        lambda: sorted(hub.list_refs(repo).tags),
        lambda: hub.download(repo, "nope", revision="main"),
        lambda: hub.resolve("gossip/nobody"),
        lambda: hub.resolve(repo, "round-0005"),
        lambda: hub.create_repo("gossip/../x"),
    ):
        try:
            out.append(("ok", step()))
        except Exception as exc:  # the point: both backends raise the same project error types
            out.append(("error", type(exc).__name__))
    return out


def test_both_backends_give_the_same_results_and_errors(local_hub, hf_hub, minimal_hub):
    assert isinstance(hf_hub, HfHub)
    local, remote = _transcript(local_hub), _transcript(hf_hub)
    assert local == remote
    assert _transcript(minimal_hub) == local, "a minimal Hub-compatible server: the same contract"
    errors = [entry[1] for entry in local if entry[0] == "error"]
    assert errors == [
        "PushConflictError",
        "RefExistsError",
        "EntryNotFound",
        "RepoNotFound",
        "RevisionNotFound",
        "InvalidNameError",
    ]


def test_hf_downloads_pinned_to_a_sha_are_cached(hf_hub, hub_server):
    repo = hf_hub.repo_id("jay")
    hf_hub.create_repo(repo)
    sha = hf_hub.create_commit(repo, {"u.bin": BINARY}, commit_message="one")
    first = hf_hub.download(repo, "u.bin", revision=sha)
    assert first.read_bytes() == BINARY
    served = len(hub_server.requests)
    again = hf_hub.download(repo, "u.bin", revision=sha)
    assert again == first and again.read_bytes() == BINARY
    assert len(hub_server.requests) == served, "a file at a pinned sha already in cache needs no HTTP request"


def test_local_hub_is_content_addressed_and_shares_a_root(local_hub):
    repo_a, repo_b = local_hub.repo_id("a"), local_hub.repo_id("b")
    for repo in (repo_a, repo_b):
        local_hub.create_repo(repo)
        local_hub.create_commit(repo, {"u.bin": BINARY}, commit_message="same bytes")
    path_a = local_hub.download(repo_a, "u.bin", revision="main")
    assert path_a == local_hub.download(repo_b, "u.bin", revision="main"), "one blob for identical content"
    assert not path_a.stat().st_mode & 0o222, "blobs are read-only"
    other = type(local_hub)(local_hub.root, namespace="gossip")
    assert other.resolve(repo_a) == local_hub.resolve(repo_a)


def test_minimal_server_cards_degrade_to_a_warning_and_status_still_works(minimal_hub, minimal_server, caplog,
                                                                           capsys, tmp_path, monkeypatch):  # fmt: skip
    model = calibrated_mlp()
    peer = Peer(minimal_hub, "carded", task="t", hook=AdapterCards(model.peft_config["default"].to_dict(), task="t"))
    caplog.set_level(logging.WARNING)
    for r in range(2):
        assert peer.push_round(r, update_for_round(model, r, seed=0)).created
    assert "validate-yaml" in caplog.text, "the missing optional endpoint is reported"
    assert caplog.text.count("lacks /api/validate-yaml") == 1, "once, not at every push"
    assert CARD_FILE in minimal_hub.list_files(peer.repo_id), "the card still travels, unvalidated"
    with pytest.raises(EndpointNotSupported):
        minimal_hub.list_repos()
    parser = argparse.ArgumentParser()
    add_gossip_commands(parser.add_subparsers(dest="command"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cli-cache"))
    for extra in ([], ["--peers", "carded"]):
        args = parser.parse_args(["status", "--hub", minimal_server.endpoint, "--namespace", "gossip", *extra])
        assert args.func(args) == 0
    out = capsys.readouterr()
    assert "does not list repos" in out.err and "--peers" in out.err
    assert "0 peer(s)" in out.out and "1 peer(s)" in out.out
    assert "carded" in out.out.splitlines()[-2]
