"""The collaboration's MoE is claimed, published once and verified; ``final`` is committed once (issue 24).

Peers stepped in one process on a LocalHub with the tiny model: every member builds the same MoE, so one repo holds
it and every report names it; a first claimer whose repo does not hold what the others would build is skipped with
the reason recorded, and the next member publishes its own; a peer restarted between its ``final`` commit and the
tag tags that commit instead of committing again; an MoE whose base cannot be fetched says in one line what to pass.
"""

from __future__ import annotations

import json
import time

import pytest
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from peft_sorlora.base_model import base_fingerprint
from sorlora.data.synthetic import synthetic_task
from sorlora.protocol.collab import create_collaboration
from sorlora.protocol.program import PeerData, PeerProgram
from sorlora.protocol.terms import CollabTerms, TermsError
from sorlora.runtime.model_loading import TINY_BASE_ID, load_base
from sorlora.simulation.engines.local import InProcessEngine
from sorlora_gossip import LocalHub
from sorlora_gossip.layout import FINAL_TAG

BASE, TOKENIZER, _ = load_base(TINY_BASE_ID)
TERMS = CollabTerms(
    base_model=TINY_BASE_ID, base_fingerprint=base_fingerprint(BASE), method="solora", rank=4, sparsity=0.5,
    rounds=1, local_steps=1, batch_size=4, max_len=48, max_members=3, round_timeout_s=60.0, test_share=0.0, s_max=0.5,
)  # fmt: skip
TASKS = ["synthetic-alpha", "synthetic-alpha", "synthetic-beta"]
USERS = ["ann", "ben", "cat"]
POSITIONS = {"ann": (-40_000, 0), "ben": (-39_000, 1_000), "cat": (40_000, 0)}  # two groups 80 m apart
DATA = {t: synthetic_task(t, n_train=12, n_test=2).train for t in set(TASKS)}


@pytest.fixture
def engine():
    engine = InProcessEngine(base=BASE, tokenizer=TOKENIZER, progress=False)
    yield engine
    engine.release()


def _program(root, tmp_path, user, task, engine):
    return PeerProgram(hub=LocalHub(root, namespace=user), collab_id="lab/c", peer_id=f"{user}/dev",
                       state_dir=tmp_path / "state" / user, workspace=engine.workspace,
                       data=PeerData(task=task, train=DATA[task]), position_mm=POSITIONS[user])  # fmt: skip


def _drive(programs, until=lambda p: p.done, max_seconds=180.0):
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        live = [p for p in programs if not until(p)]
        if not live:
            return
        for p in live:
            p.step()
        if all(p.waiting for p in live):
            time.sleep(0.02)
    raise AssertionError(f"not there after {max_seconds} s: {[(p.peer_id, p.phase) for p in programs]}")


def _setup(tmp_path, engine):
    root = tmp_path / "hub"
    create_collaboration(LocalHub(root, namespace="lab"), "lab/c", TERMS)
    return root, [_program(root, tmp_path, u, t, engine) for u, t in zip(USERS, TASKS)]


def _report(hub, user):
    return json.loads(hub.read_bytes(f"{user}/dev", "report.json", revision=FINAL_TAG))


def test_one_moe_published_once_and_named_by_every_member(tmp_path, engine):
    root, programs = _setup(tmp_path, engine)
    _drive(programs)
    hub = LocalHub(root, namespace="lab")
    assert len({tuple(c) for c in programs[0].state["plan"]["clusters"]}) == 2, "two clusters: a real mixture"
    published = [f"{u}/c-moe" for u in USERS if hub.repo_exists(f"{u}/c-moe")]
    assert len(published) == 1, published
    moes = {u: _report(hub, u)["moe"] for u in USERS}
    assert {m["repo"] for m in moes.values()} == set(published) and len({m["sha256"] for m in moes.values()}) == 1
    assert all(m["skipped_claims"] == {} for m in moes.values()), moes
    files = hub.list_files(published[0])
    assert {"config.json", "experts.safetensors", "tokenizer.json", "README.md"} <= set(files), files
    assert "tokenizer_config.json" in hub.list_files("ann/dev", revision=FINAL_TAG)
    card = hub.read_bytes("cat/dev", "README.md", revision=FINAL_TAG).decode()
    assert published[0] in card and TERMS.base_fingerprint in card


def test_a_first_claim_whose_repo_holds_another_moe_is_skipped_and_recorded(tmp_path, engine):
    root, programs = _setup(tmp_path, engine)
    _drive(programs, until=lambda p: p.phase == "publish")
    first = next(p for p in programs if p.peer_id == "ben/dev")
    _drive([first])  # ben claims first and publishes ben/c-moe
    hub = LocalHub(root, namespace="ben")
    tensors = load_safetensors(hub.read_bytes("ben/c-moe", "experts.safetensors", revision="main"))
    key = next(k for k in sorted(tensors) if k.endswith("::B"))
    tensors[key] = tensors[key] + 1.0  # ben (or whoever writes its namespace) changes the experts after claiming
    hub.create_commit("ben/c-moe", {"experts.safetensors": save_safetensors(tensors, metadata={"format": "solora-moe"
                      "-experts/1"})}, commit_message="tampered")  # fmt: skip
    others = [p for p in programs if p is not first]
    _drive(others)
    reports = {u: _report(hub, u)["moe"] for u in ("ann", "cat")}
    own = reports["ann"]["repo"]
    assert own in ("ann/c-moe", "cat/c-moe") and reports["cat"]["repo"] == own, reports
    for report in reports.values():
        why = report["skipped_claims"]["members/ben/dev.moe-claim"]
        assert "ben/c-moe holds MoE" in why and report["sha256"][:12] in why, why
    assert _report(hub, "ben")["moe"]["repo"] == "ben/c-moe"
    assert [u for u in USERS if hub.repo_exists(f"{u}/c-moe")] == sorted({"ben", own.split("/")[0]})


def test_a_restart_between_the_final_commit_and_its_tag_commits_final_once(tmp_path, engine, monkeypatch):
    root, programs = _setup(tmp_path, engine)
    ann = programs[0]
    _drive(programs, until=lambda p: p.phase == "publish" if p is ann else p.done)
    real = LocalHub.create_tag

    def killed(self, repo_id, tag, **kwargs):
        if repo_id == "ann/dev" and tag == FINAL_TAG:
            raise KeyboardInterrupt("killed between the final commit and its tag")
        return real(self, repo_id, tag, **kwargs)

    monkeypatch.setattr(LocalHub, "create_tag", killed)
    with pytest.raises(KeyboardInterrupt):
        _drive([ann])
    monkeypatch.setattr(LocalHub, "create_tag", real)
    hub = LocalHub(root, namespace="ann")
    finals = [c for c in hub.list_commits("ann/dev") if c.message == "ann/dev: adapter (final)"]
    assert len(finals) == 1 and FINAL_TAG not in hub.list_refs("ann/dev").tags
    restarted = _program(root, tmp_path, "ann", TASKS[0], engine)  # the same state directory: a restart
    assert restarted.phase == "publish"
    _drive([restarted])
    finals = [c for c in hub.list_commits("ann/dev") if c.message == "ann/dev: adapter (final)"]
    assert len(finals) == 1, [c.message for c in hub.list_commits("ann/dev")]
    assert hub.resolve("ann/dev", FINAL_TAG) == finals[0].sha
    assert _report(hub, "ann")["moe"]["repo"] == _report(hub, "ben")["moe"]["repo"]


def test_an_moe_whose_base_cannot_be_fetched_says_in_one_line_what_to_pass(tmp_path, engine, monkeypatch):
    from transformers import AutoModelForCausalLM

    import moe_router  # noqa: F401  (registers the model type)

    root, programs = _setup(tmp_path, engine)
    _drive(programs)
    hub = LocalHub(root, namespace="lab")
    repo = _report(hub, "ann")["moe"]["repo"]
    folder = tmp_path / "moe"
    for name in hub.list_files(repo):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(hub.read_bytes(repo, name, revision="main"))
    config = json.loads((folder / "config.json").read_text())
    assert config["base_fingerprint"] == TERMS.base_fingerprint
    config["base_model_name_or_path"] = "nobody/not-hosted-here"
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError) as caught:
        AutoModelForCausalLM.from_pretrained(folder)
    message = str(caught.value)
    assert "\n" not in message and "'nobody/not-hosted-here'" in message and "pass a local copy" in message, message
    assert TERMS.base_fingerprint in message and "base_model=" in message
    base, _, _ = load_base(TINY_BASE_ID)
    model = AutoModelForCausalLM.from_pretrained(folder, base_model=base)  # what the line says to pass
    assert model.config.model_type == "solora_moe" and model.num_experts == 2


def test_an_moe_naming_the_bundled_base_loads_it_offline_when_the_fingerprint_matches(tmp_path, engine, monkeypatch):
    """The fallback on the tiny MoE (the bundled loader stands in for the tiny base, which loading SmolLM2 three
    times would cost minutes): used when its fingerprint is the config's, never when it is another."""
    from transformers import AutoModelForCausalLM

    import moe_router  # noqa: F401  (registers the model type)
    import peft_sorlora.base_model as base_model
    from moe_router.configuration import ImplicitMoEConfig
    from moe_router.modeling import _bundled_base

    root, programs = _setup(tmp_path, engine)
    _drive(programs)
    hub = LocalHub(root, namespace="lab")
    repo = _report(hub, "ann")["moe"]["repo"]
    folder = tmp_path / "moe"
    for name in hub.list_files(repo):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(hub.read_bytes(repo, name, revision="main"))
    config = json.loads((folder / "config.json").read_text())
    config["base_model_name_or_path"] = base_model.BUNDLED_BASE_ID  # not reachable offline
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(base_model, "load_base_model", lambda *a, **k: load_base(TINY_BASE_ID)[:2])
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "solora_moe" and base_fingerprint(model.model) != ""
    config["base_fingerprint"] = "0" * 16  # another base's weights under the same name: refused
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(OSError, match="pass a local copy of it, weights fingerprint 0000000000000000"):
        AutoModelForCausalLM.from_pretrained(folder)
    assert _bundled_base(ImplicitMoEConfig(), None) is None, "a name alone proves nothing"


def test_moe_claims_are_read_in_commit_order_and_each_invalid_one_says_why(tmp_path):
    from sorlora.protocol.publish import claim_bytes, moe_claims

    hub = LocalHub(tmp_path / "hub", namespace="lab")
    hub.create_repo("lab/c")
    sha = "ab" * 32
    writes = [  # one commit each, in this order
        ("members/ben/dev.moe-claim", claim_bytes("ben/dev", "ben/c-moe", sha)),
        ("members/eve/dev.moe-claim", claim_bytes("eve/dev", "eve/c-moe", sha)),  # not a member of the plan
        ("members/cat/dev.moe-claim", claim_bytes("cat/dev", "ann/c-moe", sha)),  # another user's namespace
        ("members/dan/dev.moe-claim", b"\x00not json"),
        ("members/fay/dev.moe-claim", claim_bytes("fay/dev", "fay/c-moe", "xyz")),
        ("members/gil/dev.moe-claim", claim_bytes("ann/dev", "gil/c-moe", sha)),  # names another member
        ("members/ann/dev.moe-claim", claim_bytes("ann/dev", "ann/c-moe", sha)),
    ]
    for path, data in writes:
        hub.create_commit("lab/c", {path: data}, commit_message=path)
    hub.create_commit("lab/c", {"members/ben/dev.moe-claim": claim_bytes("ben/dev", "ben/c-moe", "cd" * 32)},
                      commit_message="ben changes its claim: its place is now last")  # fmt: skip
    members = ["ann/dev", "ben/dev", "cat/dev", "dan/dev", "fay/dev", "gil/dev"]
    claims = moe_claims(hub, "lab/c", members=members)
    assert [c.path.split("/")[1] for c in claims] == ["eve", "cat", "dan", "fay", "gil", "ann", "ben"]
    why = {c.path.split("/")[1]: c.problem for c in claims}
    assert "not a member of the plan" in why["eve"]
    assert "not cat/c-moe" in why["cat"] and "unreadable" in why["dan"] and "64 hex" in why["fay"]
    assert "not the member of its path" in why["gil"]
    assert why["ann"] == "" and why["ben"] == "" and claims[-1].sha256 == "cd" * 32


def test_a_member_without_a_copy_loads_the_base_the_collaboration_hosts(tmp_path, monkeypatch):
    """A base the member cannot fetch elsewhere (an id no Hub has, and offline) comes from the collaboration's own
    hub when it hosts it (collab create --host-base); its fingerprint is still checked against the pinned one."""
    from sorlora.protocol.publish import host_base

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = LocalHub(tmp_path / "hub", namespace="lab")
    repo = host_base(hub, "lab/c", TINY_BASE_ID, TERMS.base_fingerprint)
    assert repo == "lab/c-base" and "config.json" in hub.list_files(repo)
    terms = TERMS.replace(base_model="lab/private-tiny", base_repo=repo, method="solora-single")
    create_collaboration(hub, "lab/c", terms)
    program = PeerProgram(hub=LocalHub(tmp_path / "hub", namespace="ann"), collab_id="lab/c", peer_id="ann/dev",
                          state_dir=tmp_path / "ann", data=PeerData(task=TASKS[0], train=DATA[TASKS[0]]))  # fmt: skip
    program.step()  # loads the base (from lab/c-base), checks its fingerprint, registers
    assert program.phase == "plan" and base_fingerprint(program.ws.base) == TERMS.base_fingerprint
    assert (tmp_path / "ann" / "hosted-base" / "config.json").exists()
    wrong = TERMS.replace(base_model="lab/private-tiny", base_repo=repo, base_fingerprint="0" * 16)
    create_collaboration(hub, "lab/d", wrong)
    other = PeerProgram(hub=LocalHub(tmp_path / "hub", namespace="ben"), collab_id="lab/d", peer_id="ben/dev",
                        state_dir=tmp_path / "ben", data=PeerData(task=TASKS[0], train=DATA[TASKS[0]]))  # fmt: skip
    with pytest.raises(TermsError, match="fingerprint"):
        other.step()
