"""The ``sorlora`` CLI table: every bad input is one line that says what to do, exit code 2, before any model loads.

Rows run ``sorlora.cli.main`` in-process with the model loader replaced by one that fails the test, so a row that
reached model loading would not pass. One subprocess test checks the real console script prints no traceback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sorlora.cli import build_parser, main
from sorlora.methods.specs import ALL_METHODS
from sorlora.simulation.config import ConfigError, ExperimentConfig, apply_settings, preset
from sorlora.simulation.setup import load_model as LOAD_MODEL

from .test_simulation_runner import TINY


@pytest.fixture(autouse=True)
def no_model_loading(monkeypatch):
    """Fail any row that gets as far as loading a model: bad input must be refused before."""

    def refuse(cfg):
        pytest.fail(f"a model was loaded for {cfg.model!r}: the bad input was not caught before")

    monkeypatch.setattr("sorlora.simulation.runner.load_model", refuse)
    monkeypatch.setattr("sorlora.study.tuning.load_model", refuse)


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY.replace(methods=("local",)).to_dict()))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``sorlora argv``; argparse's own errors exit through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # progress bars aside
    assert code == 2, (code, err)
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# (argv with {cfg}/{tmp} placeholders, fragments the one line must hold)
TABLE = [
    (["run", "--config", "{cfg}", "--set", "rounds=two"], ["rounds must be int", "'two'"]),
    (["run", "--config", "{cfg}", "--set", "rounds=2.5"], ["rounds must be int", "2.5"]),
    (["run", "--config", "{cfg}", "--set", "rounds=0"], ["rounds must be > 0"]),
    (["run", "--config", "{cfg}", "--set", "lr=fast"], ["lr must be one number or a JSON object", "lr=0.01"]),
    (["run", "--config", "{cfg}", "--set", 'lr={"nope": 0.1}'], ["unknown methods ['nope']"]),
    (["run", "--config", "{cfg}", "--set", "lr=-1"], ["learning rate must be > 0"]),
    (["run", "--config", "{cfg}", "--set", "tasks=no_such_task"], ["unknown task 'no_such_task'"]),
    (["run", "--config", "{cfg}", "--set", "methods=lora,nope"], ["unknown methods ['nope']"]),
    (["run", "--config", "{cfg}", "--set", "sparsity=2"], ["sparsity must be in (0, 1]"]),
    (["run", "--config", "{cfg}", "--set", "router_refine=best"], ["router_refine must be one of routing"]),
    (["run", "--config", "{cfg}", "--set", "roundz=2"], ["unknown setting 'roundz'", "sorlora run --help"]),
    (["run", "--config", "{cfg}", "--set", "rounds"], ["--set expects KEY=VALUE"]),
    (["run", "--config", "{cfg}", "--set", "peers=40"], ["no training data", "n_train"]),
    (["run", "--config", "{cfg}", "--set", "model=/no/such/model"], ["neither an existing model folder nor a Hub id"]),
    (["run", "--config", "{cfg}", "--run-dir", "{tmp}/a-file"], ["is a file", "--run-dir"]),
    (["run", "--config", "{cfg}", "--hub", "htp://127.0.0.1:1"], ["hub must be an http(s):// endpoint"]),
    (["run", "--config", "{tmp}/missing.json"], ["does not exist"]),
    (["run", "--config", "{tmp}/a-file"], ["is not valid JSON"]),
    (["run", "--preset", "huge"], ["invalid choice: 'huge'", "sorlora run --help"]),
    (["run", "--engine", "spark"], ["invalid choice: 'spark'"]),
    (["tune-lr", "--config", "{cfg}", "--grid", "fast,slow"], ["comma-separated numbers"]),
    (["tune-lr", "--config", "{cfg}", "--set", "n_validation=0"], ["n_validation"]),
    (["tune-lr", "--config", "{cfg}", "--set", "n_validation=4", "--methods", "nope"], ["unknown methods ['nope']"]),
    (["status", "--hub", "htp://127.0.0.1:1"], ["unknown scheme", "http(s)://"]),
    (["status", "--hub", "{tmp}/no-hub-here"], ["no hub folder", "http(s)://"]),
    (["pull", "--hub", "{tmp}/no-hub-here", "--peer", "a", "--round", "x", "--neighbours", "b"], ["invalid int"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'"]),
    (
        ["push", "--hub", "{tmp}", "--peer", "a", "--round", "0", "--payload", "{tmp}/none.safetensors"],
        ["none.safetensors': no such file or directory (check the path)"],
    ),
    (["study", "--set", "rounds=two"], ["rounds must be int", "'two'"]),
    (["study", "--jobs", "0"], ["jobs must be at least 1, got 0"]),
    (
        ["collab", "create", "--hub", "{tmp}", "--collab", "ns/c", "--config", "{tmp}/no-terms.json"],
        ["no-terms.json': no such file or directory"],
    ),
]


@pytest.mark.parametrize("argv, fragments", TABLE, ids=[" ".join(a[:4]) for a, _ in TABLE])
def test_bad_input_is_one_line_and_exit_2(argv, fragments, tmp_path, tiny_config, capsys):
    (tmp_path / "a-file").write_text("not json, not a folder")
    argv = [a.replace("{cfg}", str(tiny_config)).replace("{tmp}", str(tmp_path)) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(argv, capsys)
    assert_one_line(code, err, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a refused command created files"
    assert not (tmp_path / "no-hub-here").exists() and not Path("htp:").exists()


def test_set_values_follow_the_field_types():
    cfg = apply_settings(preset("smoke"), ["tasks=strategyqa", "rounds=2", "lr=0.01", "router_top_k=none"])
    assert cfg.tasks == ("strategyqa",), "one task, not its characters"
    assert cfg.rounds == 2 and cfg.router_top_k is None
    assert cfg.lr == {m: 0.01 for m in ALL_METHODS}, "one number sets every method's learning rate"
    cfg = apply_settings(cfg, ['lr={"solora": 0.02}', "tasks=a,b", 'target_modules=["q_proj"]', "lora_alpha=8"])
    assert cfg.lr["solora"] == 0.02 and cfg.lr["lora"] == 0.01, "a JSON object changes only the methods it names"
    assert cfg.tasks == ("a", "b") and cfg.target_modules == ("q_proj",) and cfg.lora_alpha == 8.0
    with pytest.raises(ConfigError, match="rounds must be int"):
        ExperimentConfig.from_dict({**TINY.to_dict(), "rounds": 2.5})  # a --config file gets the same checks
    with pytest.raises(ConfigError, match="tasks must be list of str"):
        ExperimentConfig(tasks="strategyqa")


def test_run_help_lists_every_setting_with_type_default_and_help(capsys):
    code, out, _ = run_cli(["run", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    for name in ExperimentConfig.__dataclass_fields__:
        field = ExperimentConfig.__dataclass_fields__[name]
        assert field.metadata.get("help"), f"setting {name} has no help string (field(metadata={{'help': ...}}))"
        assert f"{name} (" in text, f"--help does not list {name}"
        assert " ".join(field.metadata["help"].split()) in text
    assert "rounds (int; default 3)" in text and "tasks (list of str; default" in text


def _commands(parser, prefix="sorlora"):
    """(name, parser) of every command and nested subcommand (e.g. ``sorlora collab create``)."""
    for action in parser._actions:
        if isinstance(action.choices, dict):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from _commands(sub, f"{prefix} {name}")


def test_every_command_explains_every_option():
    commands = dict(_commands(build_parser()))
    assert {"sorlora run", "sorlora tune-lr", "sorlora status", "sorlora push", "sorlora pull",
            "sorlora hub-serve"} <= set(commands)  # fmt: skip
    for name, sub in commands.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help"


def test_a_failed_start_leaves_nothing_that_blocks_the_corrected_command(tmp_path, tiny_config, capsys, monkeypatch):
    run_dir = tmp_path / "run"

    def broken(cfg):
        raise OSError("model weights unreadable")

    monkeypatch.setattr("sorlora.simulation.runner.load_model", broken)
    with pytest.raises(OSError):
        main(["run", "--config", str(tiny_config), "--set", "rounds=1", "--run-dir", str(run_dir), "--no-progress"])
    assert not (run_dir / "config.json").exists(), "a failed start claimed the run directory"
    monkeypatch.setattr("sorlora.simulation.runner.load_model", LOAD_MODEL)  # the corrected start loads the tiny model
    code, out, err = run_cli(["run", "--config", str(tiny_config), "--set", "rounds=1",
                            "--run-dir", str(run_dir), "--no-progress"], capsys)  # fmt: skip
    assert code == 0 and "local" in out, err
    assert json.loads((run_dir / "config.json").read_text())["rounds"] == 1
    code, _, err = run_cli(
        ["run", "--config", str(tiny_config), "--set", "rounds=2", "--run-dir", str(run_dir)], capsys
    )
    assert_one_line(code, err, "holds a run with other settings", "--run-dir")


def test_wrong_token_is_one_line_before_the_model_loads(tmp_path, tiny_config, capsys, monkeypatch):
    from sorlora_gossip.hub import HubServer

    monkeypatch.setenv("HF_TOKEN", "wrong-token-0123456789")
    with HubServer(tmp_path / "served", token="right-token-0123456789", namespace="sorlora") as server:
        code, _, err = run_cli(["run", "--config", str(tiny_config), "--hub", server.endpoint,
                                "--run-dir", str(tmp_path / "run")], capsys)  # fmt: skip
    assert_one_line(code, err, "refused the credentials", "$HF_TOKEN")
    assert "wrong-token-0123456789" not in err, "the token is never printed"


def test_wrong_token_on_push_is_one_line(tmp_path, capsys, monkeypatch):
    from sorlora_gossip.hub import HubServer

    from .gossip_payloads import calibrated_mlp, update_for_round

    payload = tmp_path / "u.safetensors"
    payload.write_bytes(update_for_round(calibrated_mlp(), 0, seed=0).to_bytes())
    monkeypatch.setenv("HF_TOKEN", "wrong-token-0123456789")
    with HubServer(tmp_path / "served", token="right-token-0123456789") as server:
        code, _, err = run_cli(["push", "--hub", server.endpoint, "--namespace", "gossip", "--peer", "a",
                                "--round", "0", "--payload", str(payload)], capsys)  # fmt: skip
        assert not server.hub.list_repos(), "nothing was written with the wrong token"
    assert_one_line(code, err, "refused the credentials", "$HF_TOKEN")


def test_busy_port_is_one_line(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        code, _, err = run_cli(["hub-serve", "--root", str(tmp_path / "h"), "--port", str(port)], capsys)
    assert_one_line(code, err, f"127.0.0.1:{port} is already in use", "--port")
    assert time.monotonic() - start < 30


def test_hub_down_is_one_line(tmp_path, tiny_config, capsys):
    """A hub nobody serves: refused before the model loads, as one line (the retry policy is HfHub's)."""
    port = free_port()
    start = time.monotonic()
    code, _, err = run_cli(["run", "--config", str(tiny_config), "--hub", f"http://127.0.0.1:{port}",
                            "--run-dir", str(tmp_path / "run")], capsys)  # fmt: skip
    assert_one_line(code, err, "hub is unreachable", f"127.0.0.1:{port}")
    assert time.monotonic() - start < 60, "reported within seconds (about 10 s of HfHub's backoff), not minutes"
    assert not (tmp_path / "run").exists()


def test_console_script_prints_one_line_not_a_traceback(tmp_path):
    """The real ``python -m sorlora`` process: a bad --set value is one stderr line and exit code 2."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run([sys.executable, "-m", "sorlora", "run", "--set", "rounds=two", "--run-dir",
                           str(tmp_path / "r")], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "rounds must be int" in proc.stderr and not (tmp_path / "r").exists()


def test_importing_sorlora_makes_openmp_wait_passively_unless_the_user_chose():
    code = "import os, sorlora, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "ACTIVE"
