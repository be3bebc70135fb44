"""``sorlora eval`` and the held-out share: two ``sorlora peer`` OS processes finish a small MoE collaboration on a
``sorlora hub-serve``-style server over real HTTP (tiny model, file data); each holds back its terms' ``test_share``
of its file, scores its own final adapter and the collaboration's MoE on it at the end and keeps both in its state;
``sorlora eval`` then scores the published adapter, the MoE and the base with intervals, as text and JSON, and
writes the result into the repo card's ``model-index``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from huggingface_hub import ModelCard

from peft_sorlora.base_model import base_fingerprint
from sorlora.cli import main
from sorlora.data.synthetic import synthetic_task
from sorlora.protocol.terms import CollabTerms
from sorlora.runtime.model_loading import TINY_BASE_ID, load_base
from sorlora.simulation.engines.processes import write_examples
from sorlora_gossip.hub import HfHub, HubServer

USERS = ("ann", "ben")
TASKS = ("synthetic-alpha", "synthetic-beta")


LOOKUPS = (  # runs `sorlora` with every DNS look-up of a host other than this machine reported on stderr
    "import socket, sys\n"
    "real = socket.getaddrinfo\n"
    "def getaddrinfo(host, *a, **k):\n"
    "    if host not in ('127.0.0.1', 'localhost', '::1'):\n"
    "        print(f'DNS LOOKUP {host}', file=sys.stderr)\n"
    "    return real(host, *a, **k)\n"
    "socket.getaddrinfo = getaddrinfo\n"
    "from sorlora.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-member solora collaboration on a HubServer (over HTTP), its peers run as OS processes: ann with
    ``--no-progress``, ben with its progress bar; neither process is told to keep telemetry off."""
    tmp = tmp_path_factory.mktemp("eval")
    terms = CollabTerms(base_model=TINY_BASE_ID, base_fingerprint=base_fingerprint(load_base(TINY_BASE_ID)[0]),
                        method="solora", rank=4, sparsity=0.5, rounds=2, local_steps=1, batch_size=4, max_len=48,
                        max_members=2, s_max=0.5, round_timeout_s=120.0, test_share=0.25, publish_base=True)  # fmt: skip
    (tmp / "terms.json").write_text(json.dumps(terms.to_dict()))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_DISABLE_TELEMETRY")}
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp / "hf-home"))
    with HubServer(tmp / "hub") as server:
        endpoint = server.endpoint
        assert (
            main(["collab", "create", "--hub", endpoint, "--collab", "lab/c", "--config", str(tmp / "terms.json")]) == 0
        )
        files = {u: write_examples(tmp / f"{t}.jsonl", synthetic_task(t, n_train=16, n_test=2).train)
                 for u, t in zip(USERS, TASKS)}  # fmt: skip

        def command(user: str) -> list[str]:
            quiet = ["--no-progress"] if user == "ann" else []
            return [sys.executable, "-c", LOOKUPS, "peer", "--hub", endpoint, "--collab", "lab/c", "--peer-id",
                    f"{user}/dev", "--data", str(files[user]), "--state-dir", str(tmp / "state" / user), "--threads",
                    "1", "--poll-interval", "0.2", "--max-seconds", "300", *quiet]  # fmt: skip

        procs = {u: subprocess.Popen(command(u), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for u in USERS}  # fmt: skip
        try:
            out = {u: p.communicate(timeout=400) for u, p in procs.items()}
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
        assert all(p.returncode == 0 for p in procs.values()), out
        again = subprocess.run(command("ann"), capture_output=True, text=True, env=env, timeout=300)
        yield {"tmp": tmp, "endpoint": endpoint, "out": {u: o for u, (o, _) in out.items()},
               "err": {u: e for u, (_, e) in out.items()}, "again": again, "files": files,
               "hub": HfHub(endpoint, namespace="lab", cache_dir=tmp / "cache")}  # fmt: skip


def test_peers_are_quiet_and_count_rounds_forward(finished):
    for user in USERS:
        assert "DNS LOOKUP" not in finished["err"][user], finished["err"][user][-2000:]
        assert "Warning" not in finished["err"][user], finished["err"][user][-2000:]
    assert "|" not in finished["err"]["ann"], "--no-progress: no bar at all"
    bar = [
        line for line in finished["err"]["ben"].replace("\r", "\n").splitlines() if "ben/dev:" in line and "|" in line
    ]
    counts = [int(re.search(r"\| (\d)/2 \[", line).group(1)) for line in bar]
    assert counts and counts == sorted(counts) and counts[-1] == 2, bar
    assert all("round" in line for line in bar), "the bar counts rounds"


def test_a_finished_peer_run_again_exits_0_and_repeats_its_held_out_scores(finished):
    again = finished["again"]
    assert again.returncode == 0, again.stderr[-2000:]
    assert "peer ann/dev: done (2 rounds)" in again.stdout and "held-out own adapter ann/dev@final" in again.stdout
    assert "DNS LOOKUP" not in again.stderr


def test_a_peer_scores_its_adapter_and_the_moe_on_its_held_out_share(finished):
    for user in USERS:
        state = json.loads((finished["tmp"] / "state" / user / "state.json").read_text())
        held = state["heldout"]
        for key in ("adapter", "moe"):
            score = held[key]
            assert score["n"] == 4, "a quarter of 16 distinct questions was held back and scored"
            assert 0 <= score["accuracy_ci"][0] <= score["accuracy"] <= score["accuracy_ci"][1] <= 1, score
            assert 0 <= score["acc_norm"] <= 1
        assert held["adapter"]["repo"] == f"{user}/dev@final" and held["moe"]["repo"].endswith("-moe")
        assert held.get("better") in ("adapter", "moe", None)
        # the registration counted only what it trained on: the file less its held-out share
        reg = json.loads(finished["hub"].read_bytes("lab/c", f"members/{user}/dev.json", revision="main"))
        assert reg["n_train"] == 12
        # the peer's published report (on main) and its card hold the same held-out scores
        report = json.loads(finished["hub"].read_bytes(f"{user}/dev", "report.json", revision="main"))
        assert report["heldout"] == held and report["task"] == TASKS[USERS.index(user)]
        card = ModelCard(finished["hub"].read_bytes(f"{user}/dev", "README.md", revision="main").decode())
        got = {r.metric_type: r.metric_value for r in card.data.eval_results
               if r.dataset_name == f"{report['task']} (held-out)"}  # fmt: skip
        assert got == {
            "accuracy": round(held["adapter"]["accuracy"], 4),
            "acc_norm": round(held["adapter"]["acc_norm"], 4),
        }
        out = finished["out"][user]
        assert f"held-out own adapter {user}/dev@final: accuracy" in out and "held-out collaboration's MoE" in out
        assert "is the better model" in out or "score the same" in out, out[-800:]


def test_eval_scores_the_published_adapter_moe_and_base_with_intervals(finished, capsys):
    hub, data = finished["endpoint"], str(finished["files"]["ann"])
    moe = json.loads((finished["tmp"] / "state" / "ann" / "state.json").read_text())["heldout"]["moe"]["repo"]
    assert "base/config.json" in finished["hub"].list_files(moe), "the MoE ships its base: eval loads it from there"
    for target, kind in (("ann/dev", "adapter"), (moe, "moe"), ("base", "base")):
        model = [] if kind == "moe" else ["--model", TINY_BASE_ID]  # the MoE ships its base (publish_base)
        assert main(["eval", target, "--hub", hub, "--data", data, *model, "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["kind"] == kind and result["n"] == 16, result
        assert result["accuracy_ci"][0] <= result["accuracy"] <= result["accuracy_ci"][1]
        assert result["accuracy_ci"][1] - result["accuracy_ci"][0] > 0, "an interval, not a point"
    # a local folder holding the adapter's files scores the same as the repo
    folder = finished["tmp"] / "ann-adapter"
    folder.mkdir(exist_ok=True)
    for name in finished["hub"].list_files("ann/dev", revision="final"):
        if "/" not in name:
            (folder / name).write_bytes(finished["hub"].read_bytes("ann/dev", name, revision="final"))
    scores = {}
    for target in ("ann/dev", str(folder)):
        assert main(["eval", target, "--hub", hub, "--data", data, "--json"]) == 0
        scores[target] = json.loads(capsys.readouterr().out)
    assert scores[str(folder)]["kind"] == "adapter"
    assert scores[str(folder)]["accuracy"] == scores["ann/dev"]["accuracy"], scores
    # the held-out share, as the peer split it: the same 4 questions and the same accuracy as in its state
    state = json.loads((finished["tmp"] / "state" / "ann" / "state.json").read_text())
    assert main(["eval", "ann/dev", "--hub", hub, "--data", data, "--test-share", "0.25", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 4 and result["accuracy"] == state["heldout"]["adapter"]["accuracy"]
    # the text line and the card
    assert main(["eval", "ann/dev", "--hub", hub, "--data", data, "--push-card"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("ann/dev@final: accuracy ") and "% [" in line and "16 questions of synthetic-alpha" in line
    card = ModelCard(finished["hub"].read_bytes("ann/dev", "README.md", revision="main").decode())
    got = {r.metric_type: r.metric_value for r in card.data.eval_results if r.dataset_name == "synthetic-alpha"}
    assert set(got) == {"accuracy", "acc_norm"} and 0 <= got["accuracy"] <= 1


def test_eval_says_in_one_line_what_to_pass_when_the_base_cannot_load(finished, capsys, tmp_path):
    started = time.monotonic()
    code = main(["eval", "ann/dev", "--hub", finished["endpoint"], "--data", str(finished["files"]["ann"]),
                 "--model", str(tmp_path / "no-such-model")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--model PATH_OR_ID" in err[0], err
    assert time.monotonic() - started < 60


def test_every_eval_option_has_help():
    from sorlora.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["eval"]
    for action in sub._actions:
        assert action.help, action.option_strings


def test_eval_refuses_an_moe_over_another_base_in_one_line(finished, capsys, tmp_path):
    from sorlora.runtime.model_loading import tiny_random_model

    other, tokenizer = tiny_random_model(seed=1)  # the same architecture, other weights
    other.save_pretrained(tmp_path / "other")
    tokenizer.save_pretrained(tmp_path / "other")
    moe = json.loads((finished["tmp"] / "state" / "ann" / "state.json").read_text())["heldout"]["moe"]["repo"]
    capsys.readouterr()
    code = main(["eval", moe, "--hub", finished["endpoint"], "--data", str(finished["files"]["ann"]), "--model",
                 str(tmp_path / "other"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not the one it was built on" in err[0], err
