"""Scale-out: the same tiny experiment with its peers in-process (local engine, the anchor) or as Ray actors.

Per peer count (4 and 8; quick: 4) and engine: wall time of one whole run (one SO-LoRA method, 2 rounds, on the tiny
random Llama and generated tasks; Ray is started once before, so actor start-up is counted but ``ray.init`` is not)
and peak memory, the sum of the resident sets of the driver and the peer actors sampled during the run (a second
figure adds Ray's own processes: raylet, GCS, idle workers). Each actor's resident set counts the shared libraries
it maps, like the driver's: the sum is what separate machines would need, an upper bound on one machine.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray

from sorlora.simulation.config import ExperimentConfig
from sorlora.simulation.engines.ray import ACTOR_TITLE
from sorlora.simulation.runner import run_experiment

from .common import Measure, release_free_memory, rows_against

__all__ = ["run", "ENTRY", "bench_config"]

ENTRY = "ray_scale"
RAY_NOTE = (
    "every actor is a process that imports torch and holds its own copy of the base model and data, and actors "
    "start (imports, model load) inside the timed run; the local engine shares one model across peers. Ray pays "
    "off when the peers outgrow one machine, not on 2 cores"
)


def bench_config(peers: int) -> ExperimentConfig:
    """The benchmarked run: the test suite's tiny experiment (solora only) with ``peers`` peers."""
    cores = os.cpu_count() or 1
    return ExperimentConfig(
        model="tiny-random", tasks=("synthetic-alpha", "synthetic-beta"), methods=("solora",), peers=peers, rounds=2,
        local_steps=2, batch_size=4, max_len=48, n_train=32, n_test=6, n_curve=3, rank=4, sparsity=0.5, s_max=0.5,
        eval_batch_size=8, threads=1, ray_cpus_per_peer=min(1.0, cores / peers), ray_timeout=600.0,
    )  # fmt: skip


class _TreePeak:
    """Samples the summed RSS of this process plus its peer actors, and of this process plus every descendant."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.driver_and_actors = 0
        self.with_ray = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-rss", daemon=True)

    @staticmethod
    def _rss(proc: psutil.Process) -> tuple[int, bool]:
        try:
            return proc.memory_info().rss, ACTOR_TITLE in " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return 0, False

    def sample(self) -> None:
        me = psutil.Process()
        own = me.memory_info().rss
        children = [self._rss(c) for c in me.children(recursive=True)]
        self.driver_and_actors = max(self.driver_and_actors, own + sum(r for r, actor in children if actor))
        self.with_ray = max(self.with_ray, own + sum(r for r, _ in children))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> _TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _one_run(cfg: ExperimentConfig, tmp: Path) -> tuple[float, int, int]:
    """(wall seconds, peak driver + actors RSS, peak RSS with Ray's processes) of one run in a fresh directory."""
    run_dir = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{cfg.engine}-{cfg.peers}-"))
    release_free_memory()  # the driver's RSS then starts from what it holds, not what earlier runs left cached
    with _TreePeak() as peak:
        start = time.perf_counter()
        run_experiment(cfg, run_dir, progress=False)
        wall = time.perf_counter() - start
    return wall, peak.driver_and_actors, peak.with_ray


def run(repeats: int = 5, quick: bool = False, counts: tuple[int, ...] | None = None) -> list[dict]:
    """Rows of wall time and peak memory per peer count, Ray engine against the local engine (the anchor).

    Engines take turns in every repeat; quick: 4 peers, one repeat, no warm-up (default: 4 and 8 peers, one warm-up
    run per engine)."""
    counts = counts or ((4,) if quick else (4, 8))
    repeats, warmup = (1, 0) if quick else (repeats, 1)
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, object_store_memory=80_000_000,
                 log_to_driver=False)  # fmt: skip
    rows: list[dict] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
            for n in counts:
                configs = {"local": bench_config(n), "ray": bench_config(n).replace(engine="ray")}
                samples: dict[str, list[tuple[float, int, int]]] = {k: [] for k in configs}
                for i in range(warmup + repeats):
                    for name, cfg in configs.items():
                        result = _one_run(cfg, Path(tmp))
                        if i >= warmup:
                            samples[name].append(result)
                params = {"model": "tiny-random-llama", "peers": n, "method": "solora", "rounds": 2,
                          "ray_cpus_per_peer": configs["ray"].ray_cpus_per_peer, "cores": os.cpu_count()}  # fmt: skip
                wall = {k: Measure(tuple(s[0] for s in v)) for k, v in samples.items()}
                memory = {
                    "local": Measure(tuple(s[1] for s in samples["local"])),
                    "ray": Measure(tuple(s[1] for s in samples["ray"])),
                    "ray_with_daemons": Measure(tuple(s[2] for s in samples["ray"])),
                }
                rows += rows_against(
                    ENTRY, wall, anchor="local", unit="s/run", anchor_label="local engine", notes={"ray": RAY_NOTE},
                    params=params, group=f"{ENTRY}/{n}_peers/wall",
                )  # fmt: skip
                rows += rows_against(
                    ENTRY, memory, anchor="local", unit="bytes", anchor_label="local engine (driver)",
                    notes={"ray": f"driver + {n} actors: {RAY_NOTE}",
                           "ray_with_daemons": "plus raylet, GCS and Ray's idle worker processes"},
                    params=params, group=f"{ENTRY}/{n}_peers/peak_memory",
                )  # fmt: skip
    finally:
        if started:
            ray.shutdown()
    for row in rows:
        row["name"] = f"{row['params']['peers']} peers {row['name']}"
    return rows
