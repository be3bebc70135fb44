"""One collaboration as it would run for real: ``sorlora hub-serve`` with a token per user and four ``sorlora peer``
OS processes (tiny model, their own JSONL data files, 2 clusters, 3 rounds) and no other coordination. One peer is
SIGKILLed mid-round and started again. Then: every peer finished; every round of every peer is on the hub exactly
once; the plan each computed is the one committed; the inter-cluster bytes were counted; the collaboration's one
MoE, which every peer's report names, loads with ``AutoModelForCausalLM.from_pretrained`` from the server and
generates; the same terms stepped in one process give the same published adapters, bit for bit, and the same MoE;
nothing published names a local path."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time

import pytest

from peft_sorlora.base_model import base_fingerprint
from sorlora.data.synthetic import synthetic_task
from sorlora.protocol.program import CRASH_ENV
from sorlora.protocol.terms import CollabTerms
from sorlora.runtime.model_loading import TINY_BASE_ID, load_base
from sorlora.simulation.engines.base import PeerLaunch
from sorlora.simulation.engines.local import InProcessEngine
from sorlora.simulation.engines.processes import write_examples
from sorlora_gossip import HfHub, LocalHub

pytestmark = pytest.mark.timeout(900)

USERS = ["alice", "bob", "carol", "dave"]
TASKS = ["synthetic-alpha", "synthetic-alpha", "synthetic-beta", "synthetic-beta"]
POSITIONS = [(-40_000, 0), (-39_000, 1_000), (40_000, 0), (39_000, -1_000)]  # two groups 80 m apart
COLLAB = "coord/lab"


def _terms() -> dict:
    base, _, _ = load_base(TINY_BASE_ID)
    return CollabTerms(
        base_model=TINY_BASE_ID, base_fingerprint=base_fingerprint(base), method="solora", rank=4, sparsity=0.5,
        rounds=3, local_steps=2, batch_size=4, max_len=48, max_members=4, s_max=0.5, round_timeout_s=240.0,
        publish_base=True, test_share=0.0,  # every record trains, as in the in-process run below
    ).to_dict()  # fmt: skip


def _data(tmp_path) -> dict[str, object]:
    tasks = {t: synthetic_task(t, n_train=16, n_test=2) for t in set(TASKS)}
    out = {}
    for k, (user, task) in enumerate(zip(USERS, TASKS)):
        holders = [i for i, t in enumerate(TASKS) if t == task]
        out[user] = tasks[task].train[holders.index(k) :: len(holders)]
    return out


@pytest.fixture(scope="module")
def collaboration(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("collab")
    tokens = {u: secrets.token_hex(16) for u in ["coord", *USERS]}
    (tmp / "tokens.json").write_text(json.dumps(tokens))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", CRASH_ENV)}
    env["OMP_NUM_THREADS"] = "1"
    server = subprocess.Popen([sys.executable, "-m", "sorlora", "hub-serve", "--root", str(tmp / "hub"), "--port", "0",
                               "--tokens-file", str(tmp / "tokens.json")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    try:
        line = server.stdout.readline()
        endpoint = re.search(r"at (http://127\.0\.0\.1:\d+)", line).group(1)
        (tmp / "terms.json").write_text(json.dumps(_terms()))
        created = subprocess.run([sys.executable, "-m", "sorlora", "collab", "create", "--hub", endpoint, "--collab",
                                  COLLAB, "--config", str(tmp / "terms.json")], env={**env, "HF_TOKEN": tokens["coord"]},
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
        assert created.returncode == 0, created.stderr[-2000:]
        data = _data(tmp)

        def peer_cmd(k: int) -> list[str]:
            user = USERS[k]
            data_file = write_examples(tmp / "data" / f"{user}.jsonl", data[user])
            return [sys.executable, "-m", "sorlora", "peer", "--hub", endpoint, "--collab", COLLAB, "--peer-id",
                    f"{user}/dev", "--data", str(data_file), "--task", TASKS[k], "--state-dir", str(tmp / "state" / user),
                    f"--position-mm={POSITIONS[k][0]},{POSITIONS[k][1]}", "--threads", "1", "--no-progress",
                    "--poll-interval", "0.2", "--max-seconds", "600"]  # fmt: skip

        def start(k: int, **extra: str) -> subprocess.Popen:
            log = open(tmp / f"{USERS[k]}.log", "a")  # noqa: SIM115 - the process owns it
            return subprocess.Popen(peer_cmd(k), stdout=log, stderr=subprocess.STDOUT,
                                    env={**env, "HF_TOKEN": tokens[USERS[k]], **extra})  # fmt: skip

        crash = {CRASH_ENV: "bob/dev:pushed:1"}  # bob dies by SIGKILL after pushing round 1, before pulling it
        procs = {k: start(k, **(crash if USERS[k] == "bob" else {})) for k in range(4)}
        codes = {}
        deadline = time.monotonic() + 700
        restarted = False
        while len(codes) < 4 and time.monotonic() < deadline:
            for k, proc in procs.items():
                if k not in codes and proc.poll() is not None:
                    if USERS[k] == "bob" and not restarted:
                        assert proc.returncode == -9, (tmp / "bob.log").read_text()[-2000:]
                        restarted = True
                        procs[k] = start(k)  # the same command again: it resumes
                        break
                    codes[k] = proc.returncode
            time.sleep(0.5)
        logs = {u: (tmp / f"{u}.log").read_text(errors="replace") for u in USERS}
        assert codes == dict.fromkeys(range(4), 0), {u: logs[u][-1500:] for u in USERS}
        assert restarted
        # a finished peer run again, as the README invites: nothing to do, says so, exit 0 (was an AttributeError)
        again = subprocess.run(peer_cmd(0), env={**env, "HF_TOKEN": tokens[USERS[0]]}, capture_output=True, text=True,
                               timeout=300)  # fmt: skip
        assert again.returncode == 0 and f"peer {USERS[0]}/dev: done (" in again.stdout, again.stderr[-2000:]
        yield {"tmp": tmp, "endpoint": endpoint, "tokens": tokens, "data": data, "logs": logs}
    finally:
        for proc in locals().get("procs", {}).values():
            if proc.poll() is None:
                proc.kill()
        server.terminate()
        server.wait(timeout=30)


def test_every_round_of_every_peer_is_on_the_hub_exactly_once(collaboration):
    hub = HfHub(collaboration["endpoint"], token=collaboration["tokens"]["coord"], namespace="coord",
                cache_dir=collaboration["tmp"] / "cache")  # fmt: skip
    for user in USERS:
        repo = f"{user}/dev"
        tags = sorted(t for t in hub.list_refs(repo).tags if t.startswith("round-"))
        assert tags == ["round-0000", "round-0001", "round-0002"]
        pushes = [c.message for c in hub.list_commits(repo) if "round-" in c.message]
        assert sorted(pushes) == sorted(set(pushes)) and len(pushes) == 3, pushes
    bob = json.loads((collaboration["tmp"] / "state" / "bob" / "state.json").read_text())
    assert bob["phase"] == "done" and (collaboration["tmp"] / "state" / "bob" / "crashed-once").exists()
    # the killed peer's own account of its rounds: each once, its pushed bytes those of its revisions on the hub
    report = json.loads(hub.read_bytes("bob/dev", "report.json", revision="final"))
    assert [rec["round"] for rec in report["records"]] == [0, 1, 2]
    on_hub = [hub.file_sizes("bob/dev", revision=f"round-{r:04d}")["update.safetensors"] for r in range(3)]
    assert [rec["bytes_pushed"] for rec in report["records"]] == on_hub


def test_every_peer_computed_the_committed_plan_and_counted_inter_cluster_bytes(collaboration):
    hub = HfHub(collaboration["endpoint"], token=collaboration["tokens"]["coord"], namespace="coord",
                cache_dir=collaboration["tmp"] / "cache2")  # fmt: skip
    plan = json.loads(hub.read_bytes(COLLAB, "plan.json", revision="main"))
    assert len(plan["clusters"]) == 2, plan["clusters"]
    for user in USERS:
        state = json.loads((collaboration["tmp"] / "state" / user / "state.json").read_text())
        assert state["plan"] == plan
        report = json.loads(hub.read_bytes(f"{user}/dev", "report.json", revision="final"))
        assert report["exchanges"] and report["exchanges"][-1]["bytes_pulled"] > 0
        assert all(not rec["skipped"] and not rec["rejected"] for rec in report["records"])


def _moe_of_every_member(hub) -> set[str]:
    return {json.loads(hub.read_bytes(f"{u}/dev", "report.json", revision="final"))["moe"]["repo"] for u in USERS}


def test_the_collaborations_one_moe_loads_from_the_server_and_generates(collaboration):
    script = (
        "import sys, torch, moe_router\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "out = m.generate(torch.tensor([[0, 70, 71, 72]]), max_new_tokens=3, do_sample=False)\n"
        "print(m.config.model_type, m.num_experts, out.shape[1])\n"
    )
    env = {**os.environ, "HF_ENDPOINT": collaboration["endpoint"], "HF_HUB_CACHE": str(collaboration["tmp"] / "hf"),
           "HF_TOKEN": collaboration["tokens"]["coord"]}  # fmt: skip
    hub = HfHub(collaboration["endpoint"], token=collaboration["tokens"]["coord"], namespace="coord",
                cache_dir=collaboration["tmp"] / "cache4")  # fmt: skip
    moes = _moe_of_every_member(hub)
    assert len(moes) == 1, f"every member names the one MoE: {moes}"
    assert [f"{u}/lab-moe" for u in USERS if hub.repo_exists(f"{u}/lab-moe")] == sorted(moes), "published once"
    done = subprocess.run([sys.executable, "-c", script, moes.pop()], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["solora_moe", "2", "7"]


def test_the_same_terms_in_one_process_publish_the_same_adapters(collaboration, tmp_path):
    hub = LocalHub(tmp_path / "hub", namespace="coord")
    from sorlora.protocol.collab import create_collaboration

    create_collaboration(hub, COLLAB, CollabTerms.from_dict(_terms()))
    base, tokenizer, _ = load_base(TINY_BASE_ID)
    engine = InProcessEngine(base=base, tokenizer=tokenizer, progress=False)
    launches = [PeerLaunch(peer_id=f"{u}/dev", task=TASKS[k], train=collaboration["data"][u],
                           state_dir=tmp_path / "state" / u, position_mm=POSITIONS[k]) for k, u in enumerate(USERS)]  # fmt: skip
    engine.run(hub, COLLAB, launches)
    served = HfHub(collaboration["endpoint"], token=collaboration["tokens"]["coord"], namespace="coord",
                   cache_dir=collaboration["tmp"] / "cache3")  # fmt: skip
    for user in USERS:
        for name in ("adapter_model.safetensors", "expert.safetensors"):
            assert hub.read_bytes(f"{user}/dev", name, revision="final") == served.read_bytes(
                f"{user}/dev", name, revision="final"
            ), (user, name)
    # and the same MoE, whoever claimed it first: its content hash in every report, in both runs
    hashes = {json.loads(h.read_bytes(f"{u}/dev", "report.json", revision="final"))["moe"]["sha256"]
              for h in (hub, served) for u in USERS}  # fmt: skip
    assert len(hashes) == 1, hashes


def test_nothing_published_names_a_local_path(collaboration):
    root = collaboration["tmp"] / "hub"
    local = LocalHub(root, namespace="coord")
    for repo in [r for user in ["coord", *USERS] for r in local.list_repos(user)]:
        for revision in {"main", *local.list_refs(repo).tags}:
            for name in local.list_files(repo, revision=revision):
                data = local.read_bytes(repo, name, revision=revision)
                assert b"site-packages" not in data and str(collaboration["tmp"]).encode() not in data, (repo, name)
