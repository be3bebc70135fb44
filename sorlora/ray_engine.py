"""The Ray engine: each peer of a method is a Ray actor with its own base model, workspace and hub client.

Peers still talk only through the hub (a LocalHub on storage every node shares, or a Hub endpoint) and checkpoint
their views under the run directory, so a run gives the same run directory and results as the local engine.
A peer actor that dies is restarted by Ray (``max_restarts``); the engine then replays its set-up (``setup``,
``configure``, ``restore`` of the last finished round, and the round's push if the failed phase was the pull) and
retries the phase. Pushes are idempotent, so a retried round is neither lost nor duplicated.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

try:
    import ray
    from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
except ImportError as exc:  # the optional extra is missing
    raise ValueError("--engine ray needs the optional extra: pip install 'peft-sorlora[ray]'") from exc
import torch
from tqdm.auto import tqdm

from .config import ExperimentConfig
from .methods import MethodSpec
from .peer_worker import CRASH_ENV, PeerPlan, PeerWorker

__all__ = ["RayEngine", "PeerActor", "is_phase"]

logger = logging.getLogger(__name__)

ACTOR_TITLE = "PeerActor"  # Ray names actor processes ``ray::PeerActor...`` (benchmarks find them by it)


class PeerActor:
    """One peer of one method in its own process: loads the base model, tasks and hub from the config, then runs
    :class:`~sorlora.peer_worker.PeerWorker` phases for the driver."""

    def __init__(self, cfg: dict[str, Any], method: str, peer: int, run_dir: str, method_dir: str) -> None:
        from .methods import METHOD_SPECS
        from .runner import Runner
        from .workspace import Workspace

        os.environ.pop(CRASH_ENV, None)  # a crash point is armed per life by ``arm`` (a restarted actor runs clean)
        config = ExperimentConfig.from_dict(cfg)
        if config.threads:
            torch.set_num_threads(config.threads)
        loaded = Runner(config, run_dir, progress=False)
        loaded._load()  # the driver's own loading: base model (frozen), tokenizer, tasks, shards, hub
        spec = METHOD_SPECS[method]
        self.worker = PeerWorker(
            cfg=config, spec=spec, peer=peer, workspace=Workspace(loaded.base, loaded.base_id, config, spec),
            hub=loaded.hub, shard=loaded.shards[peer], tokenizer=loaded.tokenizer,
            method_dir=method_dir,
        )  # fmt: skip

    def arm(self, crash_at: str | None) -> int:
        """Ready check returning the pid; ``crash_at`` sets ``CRASH_ENV`` (a simulated kill) for this life only."""
        if crash_at:
            os.environ[CRASH_ENV] = crash_at
        return os.getpid()

    def call(self, phase: str, *args: Any) -> Any:
        """Run one PeerWorker phase (a public method of :class:`~sorlora.peer_worker.PeerWorker`)."""
        if not is_phase(phase):
            raise ValueError(f"{phase!r} is not a public PeerWorker method")
        return getattr(self.worker, phase)(*args)

    def rebuild(self, plan: PeerPlan | None, restored: int | None, pushed: int | None) -> None:
        """Rebuild a restarted peer's state: set-up, its plan, the view after round ``restored`` and the own update
        of round ``pushed`` (re-trained deterministically; the push returns the revision already on the hub)."""
        self.worker.setup()
        if plan is not None:
            self.worker.configure(plan)
        if restored is not None and restored >= 0:
            self.worker.restore(restored)
        if pushed is not None:
            self.worker.train_and_push(pushed)


def is_phase(name: str) -> bool:
    """Whether ``name`` is a phase an engine may run: a public method of PeerWorker."""
    return not name.startswith("_") and callable(getattr(PeerWorker, name, None))


def _needs(cfg: ExperimentConfig) -> dict[str, float]:
    """The resources one peer actor reserves."""
    return {"CPU": cfg.ray_cpus_per_peer, "GPU": cfg.ray_gpus_per_peer, **cfg.ray_resources}


class RayEngine:
    """Runs one method's peers as Ray actors (see module docstring); same interface as ``LocalEngine``.

    Connects to ``cfg.ray_address`` or, when Ray is not initialised and no address is given, starts a local Ray
    sized so that every peer fits; the run directory must be on storage the actors can reach.
    """

    def __init__(self, runner: Any, spec: MethodSpec, method_dir: Path) -> None:
        cfg: ExperimentConfig = runner.cfg
        overrides = [k for k in ("_base", "_hub", "_tasks") if getattr(runner, k, None) is not None]
        if overrides:
            raise ValueError(
                f"the Ray engine loads each peer's model, tasks and hub from the config; Runner overrides "
                f"{[k.lstrip('_') for k in overrides]} work with the local engine only"
            )
        self.cfg, self.spec, self.progress = cfg, spec, runner.progress
        self.run_dir = Path(runner.run_dir).resolve()
        self.started_ray = False
        self.plans: dict[int, PeerPlan] = {}
        self.restarts: dict[int, int] = {}
        self.completed_round: int | None = None  # the last round every peer has checkpointed (or restored)
        self._start_ray()
        self._check_resources()
        actor_cls = ray.remote(PeerActor).options(
            num_cpus=cfg.ray_cpus_per_peer, num_gpus=cfg.ray_gpus_per_peer, resources=dict(cfg.ray_resources) or None,
            max_restarts=cfg.ray_max_restarts, max_task_retries=0,  # the engine retries after replaying set-up
        )  # fmt: skip
        cfg_dict, mdir = cfg.to_dict(), str(Path(method_dir).resolve())
        self.actors = {p: actor_cls.remote(cfg_dict, spec.name, p, str(self.run_dir), mdir) for p in range(cfg.peers)}
        crash_at = os.environ.get(CRASH_ENV)  # the local engine's simulated kill, forwarded to the actors
        try:
            refs = [a.arm.remote(crash_at) for a in self.actors.values()]
            self.pids = dict(zip(self.actors, ray.get(refs, timeout=cfg.ray_timeout)))
        except GetTimeoutError as exc:
            message = (
                f"peer actors did not start within {cfg.ray_timeout} s: each needs {_needs(cfg)}; "
                f"the cluster has {ray.available_resources()} free"
            )
            self.close()
            raise TimeoutError(message) from exc
        except BaseException:  # an actor failed to load: leave no actors (or a Ray we started) behind
            self.close()
            raise

    def _start_ray(self) -> None:
        if ray.is_initialized():
            return
        cfg = self.cfg
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # runs are offline; never phone home
        if cfg.ray_address:
            ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=True)
        else:  # a local Ray with room for every peer (fractional CPUs share the cores)
            cpus = max(os.cpu_count() or 1, math.ceil(cfg.peers * cfg.ray_cpus_per_peer))
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
        self.started_ray = True

    def _check_resources(self) -> None:
        """Fail early when the cluster can never hold every peer (an autoscaling cluster may grow: only warn)."""
        total = ray.cluster_resources()
        short = {
            k: v * self.cfg.peers for k, v in _needs(self.cfg).items() if v and v * self.cfg.peers > total.get(k, 0)
        }
        if not short:
            return
        message = f"{self.cfg.peers} peers need {short} in all; the Ray cluster has {total}"
        if self.started_ray:
            self.close()
            raise ValueError(message)
        logger.warning("%s: peers wait until the cluster grows (ray_timeout %s s)", message, self.cfg.ray_timeout)

    # ------------------------------------------------------------------ the Engine interface
    def map(self, phase: str, args: Mapping[int, tuple], *, desc: str | None = None) -> dict[int, Any]:
        """Run ``phase`` on every peer in ``args`` at once; a peer whose actor died is restarted, rebuilt and retried."""
        if not is_phase(phase):
            raise ValueError(f"{phase!r} is not a public PeerWorker method")
        if phase == "configure":
            self.plans.update({p: a[0] for p, a in args.items()})
        pending = {self.actors[p].call.remote(phase, *args[p]): p for p in sorted(args)}
        out: dict[int, Any] = {}
        deadline = time.monotonic() + self.cfg.ray_timeout
        with tqdm(total=len(pending), desc=desc or phase, disable=not self.progress, leave=False) as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise TimeoutError(
                        f"{self.spec.name}: peers {sorted(pending.values())} did not finish {phase} within "
                        f"{self.cfg.ray_timeout} s (ray_timeout)"
                    )
                peer = pending.pop(ready[0])
                try:
                    out[peer] = ray.get(ready[0], timeout=self.cfg.ray_timeout)
                except RayActorError as exc:
                    out[peer] = self._recover(peer, phase, args[peer], exc)
                bar.update()
        if phase in ("restore", "pull_and_aggregate"):  # every peer's view now stands after this round
            self.completed_round = max(int(a[0]) for a in args.values())
        return out

    def close(self) -> None:
        """Kill the peer actors; shut Ray down only if this engine started it."""
        for actor in getattr(self, "actors", {}).values():
            ray.kill(actor, no_restart=True)
        self.actors = {}
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
        self.started_ray = False

    # ------------------------------------------------------------------ recovery
    def _recover(self, peer: int, phase: str, args: tuple, error: Exception) -> Any:
        """Wait for Ray to restart ``peer``'s actor, rebuild its state from the hub and its checkpoints, retry.

        An actor that is only unreachable for a while (same process when it answers again) keeps its state and
        just retries; phases are idempotent (a repeated push returns the revision already on the hub).
        """
        configure, restored, pushed = self._replay_for(phase, args)
        actor = self.actors[peer]
        for attempt in range(self.cfg.ray_max_restarts + 1):
            logger.warning(
                "%s: peer %d died during %s%s (%s); waiting for its restart (attempt %d), then replaying its set-up",
                self.spec.name, peer, phase, args, type(error).__name__, attempt + 1,
            )  # fmt: skip
            try:
                pid = self._wait_alive(peer)
                if pid != self.pids[peer]:  # a new process: its state is gone, rebuild it
                    self.pids[peer] = pid
                    self.restarts[peer] = self.restarts.get(peer, 0) + 1
                    plan = self.plans.get(peer) if configure else None
                    ray.get(actor.rebuild.remote(plan, restored, pushed), timeout=self.cfg.ray_timeout)
                return ray.get(actor.call.remote(phase, *args), timeout=self.cfg.ray_timeout)
            except RayActorError as exc:
                error = exc
        raise RuntimeError(
            f"{self.spec.name}: peer {peer} kept dying during {phase}{args} "
            f"(ray_max_restarts={self.cfg.ray_max_restarts})"
        ) from error

    def _replay_for(self, phase: str, args: tuple) -> tuple[bool, int | None, int | None]:
        """What a fresh actor must redo before ``phase(*args)``: (configure?, round to restore, round to re-push)."""
        if phase == "setup":
            return False, None, None
        if phase in ("configure", "restore"):
            return phase == "restore", None, None
        if phase in ("train_and_push", "pull_and_aggregate"):
            round = int(args[0])
            return True, round - 1, round if phase == "pull_and_aggregate" else None
        return True, self.completed_round, None  # after the rounds (e.g. publish): the view after the last one

    def _wait_alive(self, peer: int) -> int:
        """The pid of ``peer``'s actor once it answers (Ray reports it unavailable while it restarts)."""
        deadline = time.monotonic() + self.cfg.ray_timeout
        while True:
            try:
                left = max(0.0, deadline - time.monotonic())
                return ray.get(self.actors[peer].arm.remote(None), timeout=left)
            except ActorUnavailableError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)
            except GetTimeoutError as exc:
                raise TimeoutError(
                    f"{self.spec.name}: peer {peer} did not come back within {self.cfg.ray_timeout} s"
                ) from exc
