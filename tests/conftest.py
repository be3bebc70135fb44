"""Hub fixtures: a Hub-compatible server on 127.0.0.1, both hub backends, and an isolated Hugging Face cache."""

from __future__ import annotations

import itertools
import os

# Read by huggingface_hub at import time: set before anything imports it. Our server answers "regular" uploads, so
# Xet is never needed; telemetry must never leave the machine.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Before torch loads: OpenMP threads that wait passively do not stall each other on a shared machine (sorlora/__init__).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from sorlora_gossip.hub import HfHub, HubServer, LocalHub  # noqa: E402

FAST_BACKOFF = {"backoff": 0.01, "max_backoff": 0.05}


@pytest.fixture(autouse=True)
def isolated_hf_home(tmp_path_factory, monkeypatch):
    """Point HF_HOME/HF_HUB_CACHE at a fresh folder and disable Xet and telemetry for every test."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    if os.environ.get("SORLORA_REAL_HUB") != "1":
        monkeypatch.delenv("HF_TOKEN", raising=False)
    return home


@pytest.fixture
def hub_server(tmp_path):
    """A HubServer (LocalHub storage) on 127.0.0.1 with a free port, stopped after the test."""
    with HubServer(tmp_path / "server-root") as server:
        yield server


@pytest.fixture
def local_hub(tmp_path):
    """A LocalHub in a fresh folder."""
    return LocalHub(tmp_path / "local-hub", namespace="gossip")


@pytest.fixture
def hf_hub(hub_server, tmp_path):
    """An HfHub (the real huggingface_hub client) talking HTTP to ``hub_server``, with fast test backoff."""
    return HfHub(endpoint=hub_server.endpoint, namespace="gossip", cache_dir=tmp_path / "hf-cache", **FAST_BACKOFF)


@pytest.fixture(params=["local", "hf"])
def hub(request):
    """Each backend in turn: LocalHub in a folder, and HfHub over HTTP to a HubServer started for the test."""
    return request.getfixturevalue(f"{request.param}_hub")


@pytest.fixture
def new_hub(hub, tmp_path):
    """Factory for further clients of the same storage as ``hub`` (as separate processes would open it)."""
    counter = itertools.count()

    def make():
        if isinstance(hub, LocalHub):
            return LocalHub(hub.root, namespace=hub.namespace)
        return HfHub(hub.endpoint, namespace=hub.namespace, cache_dir=tmp_path / f"hf-cache-{next(counter)}",
                     **FAST_BACKOFF)  # fmt: skip

    return make
