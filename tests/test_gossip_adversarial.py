"""The adversarial suite: every hostile-neighbour attack of issue 13, tried as an attacker would, on 127.0.0.1.

Each attack returns an :class:`Outcome`: was it rejected, with a clear error (naming the peer and the revision where a
pull met it), and how many honest updates were lost with it. The suite prints its figures (attacks tried / rejected
with a clear error / updates lost) and asserts every attack was rejected and nothing honest was lost; the README's
reliability section quotes them. ``python -m tests.test_adversarial`` prints the table without pytest.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from peft_sorlora import PayloadError, apply_sparse_update, get_sparse_update
from peft_sorlora.layer import SOLoRALayer
from sorlora_gossip import Peer, round_tag
from sorlora_gossip.dense import DenseUpdate
from sorlora_gossip.hub import HfHub, HubForbidden, HubServer, InvalidNameError, LocalHub, SecondWriterError
from sorlora_gossip.layout import INFO_FILE, UPDATE_FILE

from .gossip_payloads import calibrated_mlp, update_for_round


@dataclass(frozen=True)
class Outcome:
    """What one attack achieved."""

    attack: str
    rejected: bool  # the hostile input was refused (never accepted, applied or committed)
    clear: bool  # ... with an error saying what and where (peer and revision for a pulled one)
    lost: int  # honest updates lost because of it
    detail: str


def _world(hub) -> tuple[dict, dict]:
    """Three peers on ``hub`` (``me``, an honest ``good``, a hostile ``evil``), round 0 pushed by all."""
    models = {p: calibrated_mlp(slot=i, seed=i) for i, p in enumerate(["me", "good", "evil"])}
    peers = {p: Peer(hub, p) for p in models}
    for i, p in enumerate(peers):
        peers[p].push_round(0, update_for_round(models[p], 0, seed=i))
    peers["good"].push_round(1, update_for_round(models["good"], 1, seed=1))
    return models, peers


def _publish(hub, peer: str, round: int, payload: bytes, *, info: dict | bytes | None = None) -> str:
    """``peer`` publishes ``payload`` as its round (a consistent peer.json unless ``info`` is given), tagged."""
    repo = hub.repo_id(peer)
    if info is None:
        base = json.loads(hub.read_bytes(repo, INFO_FILE, revision=round_tag(0)))
        info = dict(base, round=round, bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    files = {UPDATE_FILE: payload, INFO_FILE: info if isinstance(info, bytes) else json.dumps(info).encode()}
    sha = hub.create_commit(repo, files, commit_message=f"{peer}: {round_tag(round)}")
    hub.create_tag(repo, round_tag(round), revision=sha)
    return sha


def _pull_outcome(name: str, hub, peers: dict, sha: str | None, *, reason: str, round: int = 1) -> Outcome:
    """``me`` pulls round ``round`` from good and evil: evil rejected naming peer and revision, good kept."""
    pull = peers["me"].pull_round(round, ["good", "evil"], timeout=2, poll_interval=0.05)
    lost = 0 if "good" in pull.updates else 1
    rejection = pull.rejected.get("evil")
    if rejection is None:
        return Outcome(name, "evil" not in pull.updates, False, lost, f"not rejected: {pull.skipped.get('evil')}")
    text = str(rejection)
    clear = "'evil'" in text and (sha is None or sha in text) and reason.lower() in rejection.reason.lower()
    return Outcome(name, "evil" not in pull.updates, clear, lost, rejection.reason[:160])


def _header_payload(good: bytes, header: dict) -> bytes:
    """``good``'s tensor data behind a hand-made safetensors JSON header."""
    (length,) = struct.unpack("<Q", good[:8])
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + good[8 + length :]


def _good_header(good: bytes) -> dict:
    (length,) = struct.unpack("<Q", good[:8])
    return json.loads(good[8 : 8 + length])


# -- attacks on a pull ------------------------------------------------------------------------------------------


def attack_json_bomb_in_peer_json(hub, tmp_path) -> Outcome:
    models, peers = _world(hub)
    bomb = b"[" * 5000 + b"]" * 5000  # 10 KB
    sha = _publish(hub, "evil", 1, update_for_round(models["evil"], 1, seed=2).to_bytes(), info=bomb)
    return _pull_outcome("JSON nesting bomb in peer.json", hub, peers, sha, reason="nests deeper")


def attack_json_bomb_in_payload_header(hub, tmp_path) -> Outcome:
    models, peers = _world(hub)
    good = update_for_round(models["evil"], 1, seed=2).to_bytes()
    (length,) = struct.unpack("<Q", good[:8])
    # 1000 levels in 2 KB, small enough to pass the size cap (a 10 KB one is refused from its size alone)
    header = b'{"bomb": ' + b"[" * 1000 + b"]" * 1000 + b", " + good[9 : 8 + length].rstrip()
    header += b" " * (-len(header) % 8)
    sha = _publish(hub, "evil", 1, struct.pack("<Q", len(header)) + header + good[8 + length :])
    return _pull_outcome("JSON nesting bomb in the payload header", hub, peers, sha, reason="nest")


def attack_oversized_payload(hub, tmp_path) -> Outcome:
    models, peers = _world(hub)
    big = tmp_path / "big.bin"
    with big.open("wb") as out:  # 64 MiB, sparse on disk: the receiver must refuse it before downloading
        out.truncate(64 << 20)
    repo = hub.repo_id("evil")
    info = json.loads(hub.read_bytes(repo, INFO_FILE, revision=round_tag(0)))
    info.update(round=1, bytes=64 << 20, sha256="0" * 64)
    sha = hub.create_commit(repo, {UPDATE_FILE: big, INFO_FILE: json.dumps(info).encode()}, commit_message="big")
    hub.create_tag(repo, round_tag(1), revision=sha)
    return _pull_outcome("oversized payload (64 MiB for a values-only round)", hub, peers, sha,
                         reason="not downloaded")  # fmt: skip


def attack_size_lie(hub, tmp_path) -> Outcome:
    models, peers = _world(hub)
    payload = update_for_round(models["evil"], 1, seed=2).to_bytes() + b"\0" * 100_000
    repo = hub.repo_id("evil")
    info = json.loads(hub.read_bytes(repo, INFO_FILE, revision=round_tag(0)))
    info.update(round=1, bytes=100, sha256=hashlib.sha256(payload).hexdigest())
    sha = hub.create_commit(repo, {UPDATE_FILE: payload, INFO_FILE: json.dumps(info).encode()}, commit_message="x")
    hub.create_tag(repo, round_tag(1), revision=sha)
    return _pull_outcome("payload larger than its peer.json says", hub, peers, sha, reason="not downloaded")


def attack_oversized_peer_json(hub, tmp_path) -> Outcome:
    models, peers = _world(hub)
    payload = update_for_round(models["evil"], 1, seed=2).to_bytes()
    info = json.loads(hub.read_bytes(hub.repo_id("evil"), INFO_FILE, revision=round_tag(0)))
    info.update(round=1, bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest(), pad="x" * (2 << 20))
    sha = _publish(hub, "evil", 1, payload, info=info)
    return _pull_outcome("2 MiB peer.json", hub, peers, sha, reason="limit")


def attack_huge_finite_values(hub, tmp_path) -> Outcome:
    models, peers = _world(hub)
    update = update_for_round(models["evil"], 1, seed=2)
    update.values[next(iter(update.values))][0] = 3e38
    sha = _publish(hub, "evil", 1, update.to_bytes())
    return _pull_outcome("finite but huge values (3e38)", hub, peers, sha, reason="beyond the")


def attack_nan_lora_alpha(hub, tmp_path) -> Outcome:
    models, peers = _world(hub)
    good = update_for_round(models["evil"], 1, seed=2).to_bytes()
    header = _good_header(good)
    header["__metadata__"]["lora_alpha"] = "nan"
    sha = _publish(hub, "evil", 1, _header_payload(good, header))
    return _pull_outcome("lora_alpha NaN in the header", hub, peers, sha, reason="finite number")


def attack_string_round(hub, tmp_path) -> Outcome:
    models, peers = _world(hub)
    good = update_for_round(models["evil"], 1, seed=2).to_bytes()
    header = _good_header(good)
    header["__metadata__"]["round"] = "one"
    sha = _publish(hub, "evil", 1, _header_payload(good, header))
    return _pull_outcome("non-integer round in the header", hub, peers, sha, reason="not an integer")


def attack_impersonation(hub, tmp_path) -> Outcome:
    models, peers = _world(hub)
    payload = update_for_round(models["evil"], 1, seed=2).to_bytes()
    info = json.loads(hub.read_bytes(hub.repo_id("good"), INFO_FILE, revision=round_tag(0)))
    info.update(round=1, bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())  # says peer_id "good"
    sha = _publish(hub, "evil", 1, payload, info=info)
    return _pull_outcome("peer.json naming another peer", hub, peers, sha, reason="not the owner")


def attack_bad_neighbour_name(hub, tmp_path) -> Outcome:
    models, peers = _world(hub)
    pull = peers["me"].pull_round(1, ["good", "../../etc"], timeout=1)
    rejection = pull.rejected.get("../../etc")
    clear = rejection is not None and "invalid repo id" in rejection.reason
    return Outcome("neighbour id escaping the namespace", rejection is not None, clear,
                   0 if "good" in pull.updates else 1, rejection.reason[:160] if rejection else "")  # fmt: skip


def attack_tag_squat(hub, tmp_path) -> Outcome:
    """Another writer pre-creates good's round-0002 tag on good's round-1 commit before good pushes round 2."""
    models, peers = _world(hub)
    repo = hub.repo_id("good")
    hub.create_tag(repo, round_tag(2), revision=hub.resolve(repo, round_tag(1)))
    early = peers["me"].pull_round(2, ["good"], timeout=0.3, poll_interval=0.05)
    result = peers["good"].push_round(2, update_for_round(models["good"], 2, seed=1))
    pull = peers["me"].pull_round(2, ["good"], timeout=2)
    fixed = hub.resolve(repo, round_tag(2)) == result.sha
    accepted_forged = "good" in early.updates
    ok = pull.revisions.get("good") == result.sha
    return Outcome("tag squatting (round tag pre-created on an older commit)", not accepted_forged and fixed,
                   "squatted" in early.skipped.get("good", ""), 0 if ok else 1,
                   f"before the push: {early.skipped.get('good', '')[:100]}; after: tag repaired={fixed}")  # fmt: skip


def attack_sha_named_tag(hub, tmp_path) -> Outcome:
    models, peers = _world(hub)
    repo = hub.repo_id("good")
    r0, r1 = hub.resolve(repo, round_tag(0)), hub.resolve(repo, round_tag(1))
    try:
        hub.create_tag(repo, r0, revision=r1)
        refused, text = False, "created"
    except InvalidNameError as exc:
        refused, text = True, str(exc)
    return Outcome("tag named like a commit sha", refused and hub.resolve(repo, r0) == r0, "commit sha" in text,
                   0, text[:160])  # fmt: skip


def attack_second_live_writer(hub, tmp_path) -> Outcome:
    models, peers = _world(hub)
    stale = Peer(hub, "good")
    stale.last_pushed_round()  # a second copy of "good", started now, at round 1
    peers["good"].push_round(2, update_for_round(models["good"], 2, seed=1))
    head = hub.resolve(hub.repo_id("good"))
    try:
        stale.push_round(2, update_for_round(models["good"], 2, seed=7))  # other bytes for the same round
        refused, text = False, "pushed"
    except SecondWriterError as exc:
        refused, text = True, str(exc)
    intact = hub.resolve(hub.repo_id("good")) == head
    return Outcome("a second live writer of one peer id", refused and intact, "second copy" in text,
                   0 if intact else 1, text[:160])  # fmt: skip


def attack_file_and_folder(hub, tmp_path) -> Outcome:
    repo = hub.repo_id("evil")
    hub.create_repo(repo)
    hub.create_commit(repo, {"a": b"file"}, commit_message="a")
    try:
        hub.create_commit(repo, {"a/b": b"under a file"}, commit_message="a/b")
        refused, text = False, "committed"
    except InvalidNameError as exc:
        refused, text = True, str(exc)
    return Outcome("a file 'a' and 'a/b' in one tree", refused and hub.list_files(repo) == ["a"], "is a file" in text,
                   0, text[:160])  # fmt: skip


# -- attacks on what a receiver applies ---------------------------------------------------------------------------


def _b_values(model) -> list[torch.Tensor]:
    return [m.solora_B["default"].detach().clone() for m in model.modules() if isinstance(m, SOLoRALayer)]


def attack_payload_bad_in_its_second_layer(hub, tmp_path) -> Outcome:
    receiver = calibrated_mlp(slot=0, seed=0)
    before = _b_values(receiver)
    update = update_for_round(calibrated_mlp(slot=0, seed=0), 1, seed=5)
    second = sorted(update.values)[1]
    update.values[second] = torch.cat([update.values[second], torch.zeros(2)])
    try:
        apply_sparse_update(receiver, update)
        refused, text = False, "applied"
    except PayloadError as exc:
        refused, text = True, str(exc)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, _b_values(receiver), strict=True))
    return Outcome("payload bad in its second layer (apply)", refused and unchanged, "values for a mask" in text,
                   0 if unchanged else 1, text[:160])  # fmt: skip


def attack_refused_creation_leaves_nothing(hub, tmp_path) -> Outcome:
    receiver = calibrated_mlp(slot=0, seed=0)
    sender = calibrated_mlp(slot=1, seed=1)
    genuine = update_for_round(sender, 0, seed=1)
    forged = get_sparse_update(calibrated_mlp(slot=1, seed=1, base_model="someone/else"), round=0)
    try:
        apply_sparse_update(receiver, forged, "sender", create=True)
        refused, text = False, "created"
    except PayloadError as exc:
        refused, text = True, str(exc)
    left_behind = "sender" in receiver.peft_config
    apply_sparse_update(receiver, genuine, "sender", create=True)  # the genuine one is not blocked
    return Outcome("adapter creation from another base model's payload", refused and not left_behind,
                   "base model" in text, 0 if "sender" in receiver.peft_config else 1, text[:160])  # fmt: skip


def attack_dense_payloads(hub, tmp_path) -> Outcome:
    """Dense LoRA payloads by the same rules: string round, a key naming a base weight, a mis-shaped B."""
    values = {"base_model.model.lin0.lora_A.weight": torch.randn(4, 32),
              "base_model.model.lin0.lora_B.weight": torch.randn(32, 4)}  # fmt: skip
    good = DenseUpdate(values=values, metadata={"round": "1", "base_model": "toy/mlp-32", "config_hash": "h"})
    forged = [
        DenseUpdate(values=values, metadata=dict(good.metadata, round="abc")),
        DenseUpdate(
            values={**values, "base_model.model.lin0.base_layer.weight": torch.zeros(32, 32)}, metadata=good.metadata
        ),  # fmt: skip
        DenseUpdate(
            values={**values, "base_model.model.lin0.lora_B.weight": torch.randn(32, 3)}, metadata=good.metadata
        ),  # fmt: skip
    ]
    texts = []
    for update in forged:
        try:
            DenseUpdate.from_bytes(update.to_bytes(), masks=good.structure)
            texts.append(None)
        except PayloadError as exc:
            texts.append(str(exc))
    accepted = DenseUpdate.from_bytes(good.to_bytes(), masks=good.structure)
    return Outcome(
        "dense payloads: string round, base-weight key, mis-shaped B",
        all(texts),
        all(t and ("integer" in t or "LoRA" in t or "pair" in t) for t in texts),
        0 if accepted.num_values == good.num_values else 1,
        " | ".join(t or "accepted" for t in texts)[:160],
    )


def attack_dead_endpoint(hub, tmp_path) -> Outcome:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    dead = HfHub(f"http://127.0.0.1:{port}", namespace="gossip", cache_dir=tmp_path / "dead")
    start = time.monotonic()
    pull = Peer(dead, "me").pull_round(0, ["a"], timeout=1)
    took = time.monotonic() - start
    return Outcome("a dead endpoint (pull timeout 1 s)", took < 6 and "a" in pull.skipped, "still failing" in
                   pull.skipped.get("a", ""), 0, f"answered in {took:.1f}s")  # fmt: skip


ATTACKS: list[Callable] = [
    attack_json_bomb_in_peer_json,
    attack_json_bomb_in_payload_header,
    attack_oversized_payload,
    attack_size_lie,
    attack_oversized_peer_json,
    attack_huge_finite_values,
    attack_nan_lora_alpha,
    attack_string_round,
    attack_impersonation,
    attack_bad_neighbour_name,
    attack_tag_squat,
    attack_sha_named_tag,
    attack_second_live_writer,
    attack_file_and_folder,
    attack_payload_bad_in_its_second_layer,
    attack_refused_creation_leaves_nothing,
    attack_dense_payloads,
    attack_dead_endpoint,
]


def run_suite(hub, tmp_path: Path) -> list[Outcome]:
    """Every attack, each on a fresh world under ``tmp_path``."""
    outcomes = []
    for i, attack in enumerate(ATTACKS):
        world = hub(tmp_path / f"a{i}") if callable(hub) else hub
        (tmp_path / f"t{i}").mkdir(parents=True, exist_ok=True)
        outcomes.append(attack(world, tmp_path / f"t{i}"))
    return outcomes


def figures(outcomes: list[Outcome]) -> str:
    rows = [f"  {'attack':<60} {'rejected':>8} {'clear':>6} {'lost':>5}"]
    rows += [f"  {o.attack:<60} {o.rejected!s:>8} {o.clear!s:>6} {o.lost:>5}" for o in outcomes]
    rejected = sum(o.rejected and o.clear for o in outcomes)
    rows.append(f"adversarial suite: {len(outcomes)} attacks tried, {rejected} rejected with a clear error, "
                f"{sum(o.lost for o in outcomes)} updates lost")  # fmt: skip
    return "\n".join(rows)


@pytest.mark.parametrize("backend", ["local", "http"])
def test_every_attack_is_rejected_clearly_and_loses_nothing(backend, tmp_path, capsys):
    if backend == "local":
        outcomes = run_suite(lambda root: LocalHub(root, namespace="gossip"), tmp_path)
    else:
        with HubServer(tmp_path / "srv") as server:
            counter = iter(range(1000))
            outcomes = run_suite(
                lambda root: HfHub(
                    server.endpoint, namespace=f"w{next(counter)}", cache_dir=root / "c", backoff=0.01, max_backoff=0.05
                ),  # fmt: skip
                tmp_path,
            )
    with capsys.disabled():
        print(f"\n[{backend}]\n{figures(outcomes)}")
    failed = [o for o in outcomes if not (o.rejected and o.clear and o.lost == 0)]
    assert not failed, "\n".join(f"{o.attack}: {o.detail}" for o in failed)
    assert len(outcomes) == len(ATTACKS)


def test_a_forged_round_over_http_with_per_peer_tokens_is_never_accepted(tmp_path):
    tokens = {
        "alice": "hf_alice_0123456789abcdef",
        "mallory": "hf_mallory_0123456789abc",
        "bob": "hf_bob_0123456789abcdef0",
    }
    with HubServer(tmp_path / "srv", tokens=tokens) as server:
        hubs = {u: HfHub(server.endpoint, token=t, cache_dir=tmp_path / u, backoff=0.01) for u, t in tokens.items()}
        models = {u: calibrated_mlp(slot=i, seed=i) for i, u in enumerate(hubs)}
        alice = Peer(hubs["alice"], "p")
        alice.push_round(0, update_for_round(models["alice"], 0, seed=0))
        forged = update_for_round(models["mallory"], 0, seed=9).to_bytes()
        with pytest.raises(HubForbidden):  # mallory cannot commit to alice's repo ...
            hubs["mallory"].create_commit("alice/p", {UPDATE_FILE: forged}, commit_message="alice/p: round-0001")
        with pytest.raises(HubForbidden):  # ... nor tag in it
            hubs["mallory"].create_tag("alice/p", round_tag(1))
        # ... and a round she publishes in her own repo, claiming to be alice's, is refused by its peer.json
        Peer(hubs["mallory"], "p").push_round(0, update_for_round(models["mallory"], 0, seed=9))
        repo = "mallory/p"
        info = json.loads(hubs["mallory"].read_bytes(repo, INFO_FILE, revision=round_tag(0)))
        info.update(peer_id="alice/p")
        sha = hubs["mallory"].create_commit(repo, {INFO_FILE: json.dumps(info).encode()}, commit_message="claim")
        hubs["mallory"].delete_tag(repo, round_tag(0))
        hubs["mallory"].create_tag(repo, round_tag(0), revision=sha)
        pull = Peer(hubs["bob"], "p").pull_round(0, ["alice/p", "mallory/p"], timeout=2)
        assert pull.revisions["alice/p"] == hubs["bob"].resolve("alice/p", round_tag(0))
        # mallory's round 0 is the first commit of her history carrying it (her own, as mallory): the claim her tag
        # was moved to is never used, and recorded as an equivocation
        assert pull.revisions["mallory/p"] != sha and pull.infos["mallory/p"]["peer_id"] != "alice/p"
        assert pull.equivocations["mallory/p"].revision == sha


if __name__ == "__main__":  # python -m tests.test_adversarial
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        print(figures(run_suite(lambda root: LocalHub(root, namespace="gossip"), Path(folder))))
