"""``sorlora collab create|status`` and ``sorlora peer`` on a folder hub: terms written once, status shows members,
registration and plan; a bad data file is one clear line naming file, line and field; every option has help."""

from __future__ import annotations

import json

import pytest

from sorlora.cli import build_parser, main
from sorlora.cli.collab import load_peer_data
from sorlora.data.synthetic import synthetic_task
from sorlora.protocol.program import PeerData, PeerProgram
from sorlora.runtime.model_loading import TINY_BASE_ID, load_base
from sorlora.simulation.engines.local import InProcessEngine
from sorlora.simulation.engines.processes import write_examples


def test_create_then_status_shows_registration_and_plan(tmp_path, capsys):
    terms = tmp_path / "terms.json"
    terms.write_text(json.dumps({"base_model": TINY_BASE_ID, "method": "solora-single", "max_members": 2,
                                 "rounds": 1, "local_steps": 1, "batch_size": 2, "max_len": 48, "rank": 4}))  # fmt: skip
    hub = str(tmp_path / "hub")
    assert main(["collab", "create", "--hub", hub, "--collab", "lab/c", "--config", str(terms)]) == 0
    assert "collaboration lab/c: terms" in capsys.readouterr().out
    assert main(["collab", "create", "--hub", hub, "--collab", "lab/c", "--config", str(terms)]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["collab", "status", "--hub", hub, "--collab", "lab/c"]) == 0
    assert "0/2 members, registration open" in capsys.readouterr().out

    from sorlora_gossip import LocalHub

    base, tokenizer, _ = load_base(TINY_BASE_ID)
    engine = InProcessEngine(base=base, tokenizer=tokenizer, progress=False)
    train = synthetic_task("synthetic-alpha", n_train=8, n_test=2).train
    for user in ("ann", "ben"):
        program = PeerProgram(hub=LocalHub(hub, namespace=user), collab_id="lab/c", peer_id=f"{user}/dev",
                              data=PeerData(task="synthetic-alpha", train=train), state_dir=tmp_path / user,
                              workspace=engine.workspace)  # fmt: skip
        program.step()  # register
        program.step()  # plan (closes at 2 members)
    assert main(["collab", "status", "--hub", hub, "--collab", "lab/c", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["registration"] == "closed" and [m["peer"] for m in status["members"]] == ["ann/dev", "ben/dev"]
    assert status["plan"]["clusters"] == [["ann/dev", "ben/dev"]]

    # a member's own files are untrusted: an oversized or malformed peer.json is named, the others still shown
    ben = LocalHub(hub, namespace="ben")
    ben.create_repo("ben/dev")
    for bad, why in ((b"{" * 100, "PayloadError: "), (b" " * ((1 << 20) + 1), "PayloadError: ben/dev/peer.json@")):
        ben.create_commit("ben/dev", {"peer.json": bad}, commit_message="not a peer.json")
        assert main(["collab", "status", "--hub", hub, "--collab", "lab/c"]) == 0
        out = capsys.readouterr().out
        assert f"unreadable ben/dev: {why}" in out and "ann/dev" in out and "unreadable ann/dev" not in out, out


def test_bad_data_file_is_one_line_naming_file_line_and_field(tmp_path, capsys):
    good = write_examples(tmp_path / "ok.jsonl", synthetic_task("synthetic-alpha", n_train=4, n_test=2).train)
    assert len(load_peer_data(str(good), None).train) == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "options": ["x", "y"], "answer": 0}\n{"prompt": "b", "options": ["x", "y"]}\n')
    code = main(["peer", "--hub", str(tmp_path / "hub"), "--collab", "lab/c", "--peer-id", "ann/dev", "--data",
                 str(bad)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bad.jsonl" in err[0] and "bad.jsonl:2:" in err[0] and "answer" in err[0], (
        err
    )


@pytest.mark.parametrize("argv", [["peer"], ["collab", "create"], ["collab", "status"]])
def test_every_option_has_help(argv):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[argv[0]]
    if len(argv) > 1:
        sub = sub._subparsers._group_actions[0].choices[argv[1]]
    for action in sub._actions:
        assert action.help, (argv, action.option_strings)


def test_collab_create_help_lists_every_term_with_its_default_and_meaning(capsys):
    import dataclasses

    from sorlora.protocol.terms import CollabTerms

    with pytest.raises(SystemExit):
        main(["collab", "create", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(CollabTerms):
        assert f"  {f.name} (" in text, f"term {f.name} is not in collab create --help"
        assert f.metadata.get("help") and f.metadata["help"][:30] in " ".join(text.split()), f.name
    assert "round_timeout_s (float; default 600.0)" in text and "base_model (str; required)" in text


def test_a_peer_without_task_says_which_name_it_publishes(tmp_path, capsys):
    good = write_examples(tmp_path / "phone-data.jsonl", synthetic_task("synthetic-alpha", n_train=4, n_test=2).train)
    code = main(["peer", "--hub", str(tmp_path / "hub"), "--collab", "lab/none", "--peer-id", "ann/dev", "--data",
                 str(good), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "task: 'phone-data', the data file's name (--task NAME publishes another)", err
    assert code == 2 and len(err) == 2 and "lab/none" in err[1], "then the missing collaboration, one line"
