"""The Ray engine (each peer a Ray actor running its own PeerProgram) against the in-process engine on the tiny
simulation: the same published adapters, bit for bit, and the same table; an actor SIGKILLed mid-round is restarted
by Ray and its program resumes with every round on the hub exactly once."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import ray

from sorlora.protocol.program import CRASH_ENV
from sorlora.simulation.runner import run_experiment
from sorlora_gossip import LocalHub, Peer

from .test_simulation_runner import TINY

# Fractional CPUs: 4 peer actors share the 2 cores.
CFG = TINY.replace(methods=("lora", "solora"), ray_cpus_per_peer=0.25, ray_timeout=300.0)
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def ray_cluster():
    """A small local Ray (2 CPUs, the minimum object store), offline, shut down after the module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80_000_000, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("local")
    return run_dir, run_experiment(CFG, run_dir, progress=False)


def _comparable(summary: dict) -> dict:
    """A results summary without what may differ between engines (the engine name, wall times)."""
    out = json.loads(json.dumps(summary))
    out["config"].pop("engine")
    for res in out["methods"].values():
        res.pop("seconds")
    return out


def _published(run_dir, method: str) -> dict[str, bytes]:
    hub = LocalHub(run_dir / "hub", namespace=CFG.hub_namespace)
    out = {}
    for p in range(CFG.peers):
        repo = f"{CFG.hub_namespace}/{method}-peer{p:02d}"
        for name in hub.list_files(repo, revision="final"):
            if name.endswith(".safetensors"):
                out[f"{repo}/{name}"] = hub.read_bytes(repo, name, revision="final")
    return out


def _assert_each_round_once(run_dir, method: str) -> None:
    hub = LocalHub(run_dir / "hub", namespace=CFG.hub_namespace)
    for p in range(CFG.peers):
        peer = Peer(hub, f"{CFG.hub_namespace}/{method}-peer{p:02d}")
        assert peer.last_pushed_round() == CFG.rounds - 1
        pushes = [c.message for c in hub.list_commits(peer.repo_id) if "round-" in c.message]
        assert len(pushes) == CFG.rounds and len(set(pushes)) == CFG.rounds, pushes


def test_ray_engine_gives_the_local_engine_results(ray_cluster, local_run, tmp_path):
    local_dir, expected = local_run
    run_dir = tmp_path / "ray"
    summary = run_experiment(CFG.replace(engine="ray"), run_dir, progress=False)
    assert summary["config"]["engine"] == "ray"
    assert _comparable(summary) == _comparable(expected)  # accuracy, curves, losses, bytes accounting
    for method in CFG.methods:
        want = _published(local_dir, method)
        assert len(want) >= CFG.peers
        assert _published(run_dir, method) == want, method  # every published adapter, bit for bit
        _assert_each_round_once(run_dir, method)


def test_killed_actor_is_restarted_and_resumes(ray_cluster, local_run, tmp_path, monkeypatch):
    local_dir, expected = local_run
    run_dir = tmp_path / "killed"
    # peer02's actor SIGKILLs itself right after pushing round 1 (once: the marker file disarms the restarted one)
    monkeypatch.setenv(CRASH_ENV, f"{CFG.hub_namespace}/solora-peer02:pushed:1")
    summary = run_experiment(CFG.replace(engine="ray", methods=("solora",)), run_dir, progress=False)
    assert (run_dir / "methods" / "solora" / "peers" / "peer02" / "crashed-once").exists()
    _assert_each_round_once(run_dir, "solora")
    assert _comparable(summary)["methods"]["solora"] == _comparable(expected)["methods"]["solora"]
    assert _published(run_dir, "solora") == _published(local_dir, "solora")


def test_cli_starts_its_own_ray_and_shuts_it_down(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(CFG.replace(peers=2, rounds=1, methods=("local",)).to_dict()))
    run_dir = tmp_path / "cli"
    cmd = [sys.executable, "-m", "sorlora", "run", "--config", str(config), "--run-dir", str(run_dir)]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    done = subprocess.run([*cmd, "--engine", "ray", "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Started a local Ray instance" in done.stderr
    summary = json.loads((run_dir / "results.json").read_text())
    assert summary["config"]["engine"] == "ray"


def test_unplaceable_actors_time_out_with_a_clear_message(ray_cluster, tmp_path):
    cfg = CFG.replace(engine="ray", methods=("lora",), ray_resources={"no-such-accelerator": 1.0}, ray_timeout=3.0)
    with pytest.raises(TimeoutError, match="no-such-accelerator"):
        run_experiment(cfg, tmp_path / "never", progress=False)


def test_without_ray_the_engine_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if the extra were not installed
    monkeypatch.delitem(sys.modules, "sorlora.simulation.engines.ray", raising=False)
    with pytest.raises(ValueError, match=r"pip install 'peft-sorlora\[ray\]'"):
        importlib.import_module("sorlora.simulation.engines.ray")
    with pytest.raises(ValueError, match=r"--engine ray needs the optional extra"):
        run_experiment(CFG.replace(engine="ray", methods=("lora",)), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "methods" / "lora" / "final.json").exists()
