"""Engines run a method's peers: in this process (``local``) or as Ray actors (``ray``), behind one interface.

An engine maps a :class:`~sorlora.peer_worker.PeerWorker` method over the peers and waits for all of them (one
phase of a round). Peers talk to each other only through the hub, so both engines give the same results.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from .peer_worker import PeerWorker

__all__ = ["Engine", "LocalEngine", "make_engine"]


class Engine(Protocol):
    """Runs one phase of a round on every peer and returns each peer's answer."""

    def map(self, phase: str, args: Mapping[int, tuple], *, desc: str | None = None) -> dict[int, Any]: ...

    def close(self) -> None: ...


class LocalEngine:
    """All peers in this process, taking turns in one shared workspace (one base model in memory)."""

    def __init__(self, workers: Mapping[int, PeerWorker], *, progress: bool = True) -> None:
        self.workers = dict(workers)
        self.progress = progress

    def map(self, phase: str, args: Mapping[int, tuple], *, desc: str | None = None) -> dict[int, Any]:
        out = {}
        for peer in tqdm(sorted(args), desc=desc or phase, disable=not self.progress, leave=False):
            out[peer] = getattr(self.workers[peer], phase)(*args[peer])
        return out

    def close(self) -> None:
        self.workers.clear()


def make_engine(runner: Any, spec: Any, workspace: Any, method_dir: Path) -> Engine:
    """The engine named by ``runner.cfg.engine`` for one method."""
    cfg = runner.cfg
    if cfg.engine == "ray":
        from .ray_engine import RayEngine  # optional extra: fails with a clear message without ray

        return RayEngine(runner, spec, method_dir)
    workers = {
        p: PeerWorker(
            cfg=cfg, spec=spec, peer=p, workspace=workspace, hub=runner.hub, shard=runner.shards[p],
            tokenizer=runner.tokenizer, method_dir=method_dir,
        )
        for p in range(cfg.peers)
    }  # fmt: skip
    return LocalEngine(workers, progress=runner.progress)
