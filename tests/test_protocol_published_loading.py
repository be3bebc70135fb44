"""What a collaboration publishes loads where the README says, and the MoE is published once (issue 24).

``sorlora hub-serve`` with a token per user, ``sorlora collab create --host-base`` (the pinned tiny base pushed once
to ``coord/lab-base``) and three ``sorlora peer`` OS processes (their own JSONL files, two tasks). Then a fresh Python
process with nothing but ``HF_ENDPOINT`` and a token runs the README's loading lines: it loads the MoE with ``AutoModelForCausalLM`` and its tokenizer
with ``AutoTokenizer`` from the MoE repo, and a member's adapter with ``AutoPeftModelForCausalLM`` (revision
``final``) and its tokenizer from the adapter repo, and generates with both. Exactly one MoE repo exists for the
collaboration and every member's report names it. In process: a peer restarted between its ``final`` commit and
the tag tags that commit instead of committing again; an MoE whose base cannot be fetched says in one line what to
pass."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peft_sorlora.base_model import base_fingerprint
from sorlora.data.synthetic import synthetic_task
from sorlora.protocol.collab import collab_status
from sorlora.protocol.program import CRASH_ENV
from sorlora.runtime.model_loading import TINY_BASE_ID, load_base
from sorlora.simulation.engines.processes import write_examples
from sorlora_gossip import HfHub
from sorlora_gossip.layout import FINAL_TAG, moe_claim_path

pytestmark = pytest.mark.timeout(900)

USERS = ["alice", "bob", "carol"]
TASKS = ["synthetic-alpha", "synthetic-alpha", "synthetic-beta"]
COLLAB = "coord/lab"
POSITIONS = ["-40000,0", "-39000,1000", "40000,0"]  # two groups 80 m apart: two clusters
README = Path(__file__).parents[1] / "README.md"
GENERATE = """
for name, model, tokenizer in (("moe", moe, moe_tokenizer), ("adapter", adapter, adapter_tokenizer)):
    batch = tokenizer(["Question: which is larger?"], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    kind = model.config.model_type if name == "moe" else getattr(model.peft_config["default"].peft_type, "value", None)
    print(name, type(model).__name__, kind, out.shape[1] - batch["input_ids"].shape[1],
          repr(tokenizer.decode(out[0])[:40]))
"""


def readme_loading_lines() -> str:
    """The README's lines that load what a collaboration made, verbatim."""
    section = README.read_text().split("**Loading what a collaboration made.**", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    return code


@pytest.fixture(scope="module")
def collaboration(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("journey")
    tokens = {u: secrets.token_hex(16) for u in ["coord", *USERS]}
    (tmp / "tokens.json").write_text(json.dumps(tokens))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT", CRASH_ENV)}
    env["OMP_NUM_THREADS"] = "1"
    server = subprocess.Popen([sys.executable, "-m", "sorlora", "hub-serve", "--root", str(tmp / "hub"), "--port", "0",
                               "--tokens-file", str(tmp / "tokens.json")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip
    procs: dict[str, subprocess.Popen] = {}
    try:
        endpoint = re.search(r"at (http://127\.0\.0\.1:\d+)", server.stdout.readline()).group(1)
        base, _, _ = load_base(TINY_BASE_ID)
        terms = {"base_model": TINY_BASE_ID, "base_fingerprint": base_fingerprint(base), "method": "solora", "rank": 4,
                 "sparsity": 0.5, "rounds": 2, "local_steps": 1, "batch_size": 4, "max_len": 48, "max_members": 3,
                 "round_timeout_s": 240.0, "test_share": 0.0, "s_max": 0.5}  # fmt: skip
        (tmp / "terms.json").write_text(json.dumps(terms))
        created = subprocess.run([sys.executable, "-m", "sorlora", "collab", "create", "--hub", endpoint, "--collab",
                                  COLLAB, "--config", str(tmp / "terms.json"), "--host-base"],
                                 env={**env, "HF_TOKEN": tokens["coord"]}, capture_output=True, text=True,
                                 timeout=300)  # fmt: skip
        assert created.returncode == 0, created.stderr[-2000:]
        assert "hosted at coord/lab-base" in created.stdout, created.stdout
        tasks = {t: synthetic_task(t, n_train=12, n_test=2) for t in set(TASKS)}
        for k, user in enumerate(USERS):
            data = write_examples(tmp / "data" / f"{user}.jsonl", tasks[TASKS[k]].train[k % 2 :: 2])
            log = open(tmp / f"{user}.log", "w")  # noqa: SIM115 - the process owns it
            procs[user] = subprocess.Popen(
                [sys.executable, "-m", "sorlora", "peer", "--hub", endpoint, "--collab", COLLAB, "--peer-id",
                 f"{user}/dev", "--data", str(data), "--task", TASKS[k], "--state-dir", str(tmp / "state" / user),
                 f"--position-mm={POSITIONS[k]}", "--threads", "1", "--no-progress", "--poll-interval", "0.2",
                 "--max-seconds", "600"],
                stdout=log, stderr=subprocess.STDOUT, env={**env, "HF_TOKEN": tokens[user]},
            )  # fmt: skip
        deadline = time.monotonic() + 700
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
        logs = {u: (tmp / f"{u}.log").read_text(errors="replace") for u in USERS}
        assert {u: p.returncode for u, p in procs.items()} == dict.fromkeys(USERS, 0), {
            u: logs[u][-1500:] for u in USERS
        }
        hub = HfHub(endpoint, token=tokens["coord"], namespace="coord", cache_dir=tmp / "cache")
        yield {"tmp": tmp, "endpoint": endpoint, "tokens": tokens, "hub": hub, "fingerprint": terms["base_fingerprint"]}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        server.terminate()
        server.wait(timeout=30)


def test_one_moe_for_the_collaboration_named_by_every_member(collaboration):
    hub = collaboration["hub"]
    moes = [f"{u}/lab-moe" for u in USERS if hub.repo_exists(f"{u}/lab-moe")]
    every = [r for u in ["coord", *USERS] for r in hub.list_repos(u) if r.endswith("-moe")]
    assert len(moes) == 1 and every == moes, every
    reports = {u: json.loads(hub.read_bytes(f"{u}/dev", "report.json", revision=FINAL_TAG)) for u in USERS}
    for user, report in reports.items():
        assert report["moe"]["repo"] == moes[0] and report["moe"]["skipped_claims"] == {}, (user, report["moe"])
        card = hub.read_bytes(f"{user}/dev", "README.md", revision=FINAL_TAG).decode()
        assert moes[0] in card and "AutoPeftModelForCausalLM.from_pretrained" in card, user
        claim = json.loads(hub.read_bytes(COLLAB, moe_claim_path(user, "dev"), revision="main"))
        assert claim["sha256"] == report["moe"]["sha256"], "every member would build the same MoE"
    assert len({r["moe"]["sha256"] for r in reports.values()}) == 1
    assert {r["moe"]["claimed_by"] for r in reports.values()} == {moes[0].split("/")[0] + "/dev"}
    config = json.loads(hub.read_bytes(moes[0], "config.json", revision="main"))
    assert config["base_model_name_or_path"] == "coord/lab-base" and not config["base_in_repo"]
    assert len(config["experts"]) == 2, "one expert per cluster"
    assert config["base_fingerprint"] == collaboration["fingerprint"]
    status = collab_status(hub, COLLAB)  # what `sorlora collab status` shows
    assert [m.get("moe") for m in status["members"]] == moes * len(USERS), status["members"]
    adapter = json.loads(hub.read_bytes("alice/dev", "adapter_config.json", revision=FINAL_TAG))
    assert adapter["base_model_name_or_path"] == "coord/lab-base"


def test_a_fresh_process_with_only_the_endpoint_and_a_token_loads_and_generates(collaboration, tmp_path):
    hub = collaboration["hub"]
    moe = json.loads(hub.read_bytes("bob/dev", "report.json", revision=FINAL_TAG))["moe"]["repo"]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": collaboration["endpoint"], "HF_TOKEN": collaboration["tokens"]["carol"],
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    code = readme_loading_lines()  # the README's names stand for this run's repos
    assert '"alice/smollm-collab-moe"' in code and '"bob/smollm-peer"' in code, code
    code = code.replace('"alice/smollm-collab-moe"', repr(moe)).replace('"bob/smollm-peer"', repr("bob/dev"))
    done = subprocess.run([sys.executable, "-c", code + GENERATE], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split()[:4] for line in lines] == [
        ["moe", "ImplicitMoEForCausalLM", "solora_moe", "4"],
        ["adapter", "PeftModelForCausalLM", "SOLORA", "4"],
    ], done.stdout
