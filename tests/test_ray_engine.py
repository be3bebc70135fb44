"""The Ray engine (peers as Ray actors) against the local engine on the tiny experiment: the same checkpoints, table
and bytes; a peer actor killed mid-round is restarted and the round completes with every revision on the hub once."""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from sorlora.engines import make_engine
from sorlora.methods import METHOD_SPECS
from sorlora.peer_worker import PeerPlan
from sorlora.runner import CRASH_ENV, Runner, run_experiment
from sorlora.workspace import Workspace
from sorlora_gossip import LocalHub, Peer

from .test_experiment_runner import TINY

# Fractional CPUs: 4 peer actors share the 2 cores. The whole file runs in `make test` (about 2 minutes).
CFG = TINY.replace(methods=("lora", "solora"), ray_cpus_per_peer=0.25, ray_timeout=300.0)
pytestmark = pytest.mark.timeout(600)


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


def test_cli_starts_its_own_ray_and_shuts_it_down(tmp_path):
    """``sorlora run --engine ray`` with Ray not running: the engine starts a local Ray sized for the peers."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(CFG.replace(peers=2, rounds=1, methods=("lora",)).to_dict()))
    run_dir = tmp_path / "cli"
    cmd = [sys.executable, "-m", "sorlora", "run", "--config", str(config), "--run-dir", str(run_dir)]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    done = subprocess.run(
        [*cmd, "--engine", "ray", "--no-progress"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Started a local Ray instance" in done.stderr
    summary = json.loads((run_dir / "results.json").read_text())
    assert summary["config"]["engine"] == "ray"
    assert sorted(_checkpoints(run_dir, "lora")) == ["peer00/round-0000.safetensors", "peer01/round-0000.safetensors"]


def _comparable(summary: dict) -> dict:
    """A results summary without what may differ between engines (the engine name, wall times)."""
    out = json.loads(json.dumps(summary))
    out["config"].pop("engine")
    for res in out["methods"].values():
        res.pop("seconds")
    return out


def _checkpoints(run_dir: Path, method: str) -> dict[str, bytes]:
    root = run_dir / "methods" / method / "peers"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


def _assert_each_round_once(run_dir: Path, method: str) -> None:
    hub = LocalHub(run_dir / "hub", namespace=CFG.hub_namespace)
    for p in range(CFG.peers):
        peer = Peer(hub, f"{method}-peer{p:02d}")
        assert peer.last_pushed_round() == CFG.rounds - 1
        pushes = [c.message for c in hub.list_commits(peer.repo_id) if "round-" in c.message]
        assert len(pushes) == CFG.rounds, pushes
        assert len(set(pushes)) == CFG.rounds, pushes


def test_ray_engine_gives_the_local_engine_results(ray_cluster, local_run, tmp_path):
    local_dir, expected = local_run
    run_dir = tmp_path / "ray"
    summary = run_experiment(CFG.replace(engine="ray"), run_dir, progress=False)
    assert summary["config"]["engine"] == "ray"
    assert _comparable(summary) == _comparable(expected)  # accuracy, curves, losses, bytes accounting
    for method in CFG.methods:
        got, want = _checkpoints(run_dir, method), _checkpoints(local_dir, method)
        assert len(want) == CFG.peers * CFG.rounds
        assert got == want, method  # every peer's view after every round, bit for bit
        for r in range(CFG.rounds):
            ray_round = json.loads((run_dir / "methods" / method / f"round-{r:04d}.json").read_text())
            local_round = json.loads((local_dir / "methods" / method / f"round-{r:04d}.json").read_text())
            assert ray_round["bytes_pushed"] == local_round["bytes_pushed"]
            assert ray_round["comm"] == local_round["comm"]
        _assert_each_round_once(run_dir, method)


def test_killed_actor_is_restarted_and_the_round_completes(ray_cluster, local_run, tmp_path, monkeypatch, caplog):
    local_dir, expected = local_run
    run_dir = tmp_path / "killed"
    # peer02's actor dies (os._exit) right after pushing round 1, before answering the driver
    monkeypatch.setenv(CRASH_ENV, "solora:1:peer02")
    with caplog.at_level(logging.WARNING, logger="sorlora.ray_engine"):
        summary = run_experiment(CFG.replace(engine="ray", methods=("solora",)), run_dir, progress=False)
    died = [r.getMessage() for r in caplog.records if "died during" in r.getMessage()]
    assert len(died) == 1 and "peer 2 died during train_and_push(1,)" in died[0], died
    _assert_each_round_once(run_dir, "solora")
    want = _comparable(expected)["methods"]["solora"]
    assert _comparable(summary)["methods"]["solora"] == want
    assert _checkpoints(run_dir, "solora") == _checkpoints(local_dir, "solora")
    records = sorted((run_dir / "methods" / "solora").glob("round-*.json"))
    assert [p.name for p in records] == [f"round-{r:04d}.json" for r in range(CFG.rounds)]


def _one_round(cfg, run_dir: Path, *, kill_between: int | None = None) -> tuple[dict, dict[str, bytes]]:
    """Drive the engine of ``cfg`` through set-up and round 0 of ``lora`` (every peer pulls every other); with
    ``kill_between`` that peer's actor is killed (Ray restarts it) after the pushes, before the pulls."""
    runner = Runner(cfg, run_dir, progress=False)
    runner._prepare_dir()
    runner._load()
    spec, mdir = METHOD_SPECS["lora"], run_dir / "methods" / "lora"
    engine = make_engine(runner, spec, Workspace(runner.base, runner.base_id, cfg, spec), mdir)
    n = cfg.peers
    try:
        engine.map("setup", {p: () for p in range(n)})
        plans = {
            p: PeerPlan(
                neighbours=tuple(q for q in range(n) if q != p), forward=(p,), weights=dict.fromkeys(range(n), 1.0)
            )
            for p in range(n)
        }
        engine.map("configure", {p: (plans[p],) for p in range(n)})
        trained = engine.map("train_and_push", {p: (0,) for p in range(n)})
        if kill_between is not None:
            old_pid = engine.pids[kill_between]
            ray.kill(engine.actors[kill_between], no_restart=False)
        pulled = engine.map("pull_and_aggregate", {p: (0,) for p in range(n)})
        if kill_between is not None:
            assert engine.restarts == {kill_between: 1}
            assert engine.pids[kill_between] != old_pid
    finally:
        engine.close()
    assert all(not v["skipped"] and not v["rejected"] for v in pulled.values())
    return trained, _checkpoints(run_dir, "lora")


def test_actor_killed_between_push_and_pull_rebuilds_and_pulls(ray_cluster, tmp_path):
    cfg = CFG.replace(peers=2, methods=("lora",))
    trained, views = _one_round(cfg, tmp_path / "local")
    trained_ray, views_ray = _one_round(cfg.replace(engine="ray"), tmp_path / "ray", kill_between=1)
    assert trained_ray == trained
    assert len(views) == 2 and views_ray == views
    hub = LocalHub(tmp_path / "ray" / "hub", namespace=CFG.hub_namespace)
    for p in range(2):
        pushes = [c.message for c in hub.list_commits(f"{CFG.hub_namespace}/lora-peer{p:02d}") if "round-" in c.message]
        assert len(pushes) == 1, pushes


def test_unplaceable_actors_time_out_with_a_clear_message(ray_cluster, tmp_path):
    cfg = CFG.replace(engine="ray", methods=("lora",), ray_resources={"no-such-accelerator": 1.0}, ray_timeout=3.0)
    with pytest.raises(TimeoutError, match="no-such-accelerator"):
        run_experiment(cfg, tmp_path / "never", progress=False)


def test_runner_overrides_are_refused_with_ray(tmp_path):
    hub = LocalHub(tmp_path / "elsewhere", namespace=CFG.hub_namespace)
    with pytest.raises(ValueError, match=r"overrides \['hub'\] work with the local engine only"):
        run_experiment(CFG.replace(engine="ray", methods=("lora",)), tmp_path / "run", progress=False, hub=hub)


def test_without_ray_the_engine_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if the extra were not installed
    monkeypatch.delitem(sys.modules, "sorlora.ray_engine", raising=False)
    with pytest.raises(ValueError, match=r"pip install 'peft-sorlora\[ray\]'"):
        importlib.import_module("sorlora.ray_engine")
    with pytest.raises(ValueError, match=r"--engine ray needs the optional extra"):
        run_experiment(CFG.replace(engine="ray", methods=("lora",)), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "methods" / "lora" / "final.json").exists()
