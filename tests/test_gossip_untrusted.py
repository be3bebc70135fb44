"""Downloading a published repo's files through ``sorlora_gossip.untrusted.download_repo``: one pinned snapshot,
only the wanted files, every file size-capped before it is written (LocalHub, and HfHub over HTTP to a HubServer)."""

from __future__ import annotations

import pytest

from peft_sorlora.exchange import PayloadError
from sorlora_gossip.untrusted import download_repo


def _publish(hub, files: dict[str, bytes]) -> tuple[str, str]:
    repo = hub.repo_id("published-moe")
    hub.create_repo(repo)
    return repo, hub.create_commit(repo, files, commit_message="publish")


def test_download_repo_takes_the_wanted_files_of_the_pinned_commit(hub, tmp_path):
    repo, sha = _publish(hub, {
        "config.json": b'{"model_type": "x"}',
        "experts.safetensors": b"\x00" * 64,
        "base/model.safetensors": b"\x01" * 32,
        "base/deeper/model.safetensors": b"\x02" * 8,
        "other/model.safetensors": b"\x03" * 8,
        "script.py": b"print('never run')",
    })  # fmt: skip
    hub.create_commit(repo, {"late.json": b"{}"}, commit_message="after the pin")  # not in the pinned snapshot

    out = download_repo(hub, repo, tmp_path / "out", revision=sha, suffixes=(".json", ".safetensors"),
                        subfolders=("base",))  # fmt: skip

    got = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert got == ["base/model.safetensors", "config.json", "experts.safetensors"]
    assert (out / "experts.safetensors").read_bytes() == b"\x00" * 64


def test_an_oversized_file_is_refused_with_repo_file_and_revision(hub, tmp_path):
    repo, sha = _publish(hub, {"config.json": b"{}", "experts.safetensors": b"\x00" * 4096})

    with pytest.raises(PayloadError) as err:
        download_repo(hub, repo, tmp_path / "out", revision=sha, suffixes=(".safetensors",), max_bytes=1024)

    message = str(err.value)
    assert f"{repo}/experts.safetensors@{sha}" in message and "\n" not in message
    assert err.value.repo_id == repo and err.value.revision == sha
    assert not (tmp_path / "out" / "experts.safetensors").exists()  # nothing of it was written
