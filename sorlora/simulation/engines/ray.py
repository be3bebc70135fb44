"""The Ray engine: each peer is a Ray actor running its own :class:`~sorlora.protocol.program.PeerProgram`.

An actor loads the pinned base itself (its own process, its own workspace), runs its program to the end and
talks to the others only through the hub, which must be reachable from every node (a Hub endpoint, or a LocalHub
folder on shared storage), as must the state directories. An actor that dies is restarted by Ray
(``ray_max_restarts``) and its program resumes from its state directory and its revisions on the hub, so a round
is neither lost nor doubled.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

try:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError
except ImportError as exc:  # the optional extra is missing
    raise ValueError("--engine ray needs the optional extra: pip install 'peft-sorlora[ray]'") from exc

from .base import PeerLaunch

__all__ = ["PeerActor", "RayEngine"]

logger = logging.getLogger(__name__)

ACTOR_TITLE = "PeerActor"  # Ray names actor processes ``ray::PeerActor...`` (benchmarks find them by it)


class PeerActor:
    """One peer in its own process: opens the hub, builds its program from its launch, runs it to the end."""

    def __init__(self, hub_location: str, namespace: str, collab_id: str, launch: PeerLaunch, model: str | None,
                 threads: int | None, crash_at: str | None = None) -> None:  # fmt: skip
        import torch

        from ...protocol.program import CRASH_ENV, PeerData, PeerProgram

        if crash_at:  # the driver's simulated kill, forwarded (it fires once per state directory)
            os.environ[CRASH_ENV] = crash_at

        from sorlora_gossip.hub import open_hub

        if threads:
            torch.set_num_threads(threads)
        hub = open_hub(hub_location, namespace=namespace, token=os.environ.get("HF_TOKEN") or None)
        self.program = PeerProgram(hub=hub, collab_id=collab_id, peer_id=launch.peer_id,
                                   data=PeerData(task=launch.task, train=launch.train), state_dir=launch.state_dir,
                                   model=model, position_mm=launch.position_mm, poll_interval=0.2)  # fmt: skip

    def pid(self) -> int:
        return os.getpid()

    def run(self) -> str:
        """Run the program until done; returns its final phase."""
        self.program.run()
        return self.program.phase


class RayEngine:
    """Runs a collaboration's peers as Ray actors (see the module docstring); same interface as the other engines."""

    def __init__(self, *, hub_location: str, model: str | None, threads: int | None, progress: bool, cfg: Any):
        self.hub_location, self.model, self.threads, self.progress, self.cfg = (
            hub_location,
            model,
            threads,
            progress,
            cfg,
        )
        self.started_ray = False

    def _start_ray(self, peers: int) -> None:
        if ray.is_initialized():
            return
        cfg = self.cfg
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # runs are offline; never phone home
        if cfg.ray_address:
            ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=True)
        else:  # a local Ray with room for every peer (fractional CPUs share the cores)
            cpus = max(os.cpu_count() or 1, math.ceil(peers * cfg.ray_cpus_per_peer))
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
        self.started_ray = True

    def _check_resources(self, peers: int) -> None:
        """Fail early when the cluster can never hold every peer (an autoscaling cluster may grow: only warn)."""
        cfg = self.cfg
        needs = {"CPU": cfg.ray_cpus_per_peer, "GPU": cfg.ray_gpus_per_peer, **cfg.ray_resources}
        total = ray.cluster_resources()
        short = {k: v * peers for k, v in needs.items() if v and v * peers > total.get(k, 0)}
        if not short:
            return
        message = f"{peers} peers need {short} in all; the Ray cluster has {total}"
        if self.started_ray:
            self.close()
            raise ValueError(message)
        logger.warning("%s: peers wait until the cluster grows (ray_timeout %s s)", message, cfg.ray_timeout)

    def run(self, hub: Any, collab_id: str, launches: Sequence[PeerLaunch], *, desc: str = "peers") -> None:
        cfg = self.cfg
        self._start_ray(len(launches))
        self._check_resources(len(launches))
        actor_cls = ray.remote(PeerActor).options(
            num_cpus=cfg.ray_cpus_per_peer, num_gpus=cfg.ray_gpus_per_peer, resources=dict(cfg.ray_resources) or None,
            max_restarts=cfg.ray_max_restarts, max_task_retries=cfg.ray_max_restarts,  # a retried run resumes
        )  # fmt: skip
        namespace = getattr(hub, "namespace", cfg.hub_namespace)
        from ...protocol.program import CRASH_ENV

        crash_at = os.environ.get(CRASH_ENV)
        actors = [actor_cls.remote(self.hub_location, namespace, collab_id, launch, self.model, self.threads, crash_at)
                  for launch in launches]  # fmt: skip
        try:
            refs = {actor.run.remote(): launch for actor, launch in zip(actors, launches)}
            deadline = time.monotonic() + cfg.ray_timeout
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                if not ready:
                    needs = {"CPU": cfg.ray_cpus_per_peer, "GPU": cfg.ray_gpus_per_peer, **cfg.ray_resources}
                    raise TimeoutError(f"peers {[refs[r].peer_id for r in refs]} did not finish within "
                                       f"{cfg.ray_timeout} s (ray_timeout); each needs {needs}, the cluster has "
                                       f"{ray.available_resources()} free")  # fmt: skip
                launch = refs.pop(ready[0])
                try:
                    ray.get(ready[0], timeout=cfg.ray_timeout)
                except (RayActorError, GetTimeoutError) as exc:
                    raise RuntimeError(f"peer {launch.peer_id} failed on Ray: {exc}") from exc
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            self.close()

    def close(self) -> None:
        """Shut Ray down only if this engine started it."""
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
        self.started_ray = False
