"""Engines launch a collaboration's peers: each runs the same :class:`~sorlora.peer_program.PeerProgram`.

- ``local``: every program in this process, stepped in turn around one shared frozen base model (each extra peer
  costs only its adapter, so 100 peers fit in 24 GiB);
- ``processes``: every peer a separate OS process running ``sorlora peer`` on its own data file;
- ``ray``: every peer a Ray actor running its program (:mod:`sorlora.ray_engine`).

An engine only starts peers and waits for them: peers find each other, agree on the plan and exchange everything
through the hub. Engines import nothing of the runner.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .peer_program import PeerData, PeerProgram
from .sharing import TensorPool
from .tasks import Example
from .terms import CollabTerms
from .workspace import Workspace

__all__ = ["ENGINES", "InProcessEngine", "PeerLaunch", "ProcessEngine", "make_engine", "write_examples"]


@dataclass(frozen=True)
class PeerLaunch:
    """One peer to start: its repo id, its own data, its position estimate and its local state directory."""

    peer_id: str
    task: str
    train: Sequence[Example]
    state_dir: Path
    position_mm: tuple[int, int] | None = None


def write_examples(path: Path, examples: Sequence[Example]) -> Path:
    """Write examples as a JSONL data file (``prompt``, ``options``, ``answer``) that ``sorlora peer --data`` reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": e.prompt, "options": list(e.options), "answer": e.label}) for e in examples]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


class InProcessEngine:
    """All programs in this process around one base model, stepped in turn until every one is done."""

    def __init__(self, *, base: Any, tokenizer: Any, progress: bool = True, poll_interval: float = 0.05) -> None:
        self.base, self.tokenizer = base, tokenizer
        self.progress, self.poll_interval = progress, poll_interval
        self._workspaces: dict[str, Workspace] = {}
        self.tensor_pool = TensorPool()  # one copy of the equal tensors the programs hold

    def workspace(self, terms: CollabTerms) -> tuple[Workspace, Any]:
        """The workspace shared by every program of one collaboration (one per terms)."""
        key = terms.sha256()
        if key not in self._workspaces:
            self._workspaces[key] = Workspace(self.base, terms.base_model, terms, terms.spec.kind)
        return self._workspaces[key], self.tokenizer

    def programs(self, hub: Any, collab_id: str, launches: Sequence[PeerLaunch]) -> list[PeerProgram]:
        """One program per launch, all on this engine's shared workspace."""
        return [
            PeerProgram(hub=hub, collab_id=collab_id, peer_id=launch.peer_id,
                        data=PeerData(task=launch.task, train=launch.train), state_dir=launch.state_dir,
                        workspace=self.workspace, position_mm=launch.position_mm, tensor_pool=self.tensor_pool)
            for launch in launches
        ]  # fmt: skip

    def drive(self, programs: Sequence[PeerProgram], *, desc: str = "peers") -> None:
        """Step ``programs`` in turn until every one is done (sleeping ``poll_interval`` when none progressed)."""
        with tqdm(total=len(programs), desc=desc, disable=not self.progress, leave=False) as bar:
            while True:
                live = [p for p in programs if not p.done]
                if not live:
                    break
                progressed = False
                for program in live:
                    program.step()
                    progressed = progressed or not program.waiting
                    bar.set_postfix(phase=program.phase, round=program.state["round"])
                bar.n = sum(p.done for p in programs)
                bar.refresh()
                if not progressed:
                    time.sleep(self.poll_interval)

    def run(self, hub: Any, collab_id: str, launches: Sequence[PeerLaunch], *, desc: str = "peers") -> None:
        """Run every launch's program to the end, then give the base model back clean."""
        try:
            self.drive(self.programs(hub, collab_id, launches), desc=desc)
        finally:
            self.release()

    def release(self) -> None:
        """Drop the collaboration's adapters; the base model is given back clean."""
        for ws in self._workspaces.values():
            self.base = ws.release()
        self._workspaces.clear()


class ProcessEngine:
    """Every peer a separate ``sorlora peer`` OS process reading its own data file; waits for all of them."""

    def __init__(self, *, hub_location: str, model: str | None = None, threads: int | None = 1,
                 progress: bool = True, timeout: float = 3600.0, env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.hub_location, self.model, self.threads = hub_location, model, threads
        self.progress, self.timeout, self.env = progress, timeout, dict(env or {})

    def command(self, collab_id: str, launch: PeerLaunch, data_file: Path) -> list[str]:
        cmd = [sys.executable, "-m", "sorlora", "peer", "--hub", self.hub_location, "--collab", collab_id,
               "--peer-id", launch.peer_id, "--data", str(data_file), "--task", launch.task,
               "--state-dir", str(launch.state_dir), "--no-progress"]  # fmt: skip
        if launch.position_mm is not None:
            cmd.append(f"--position-mm={launch.position_mm[0]},{launch.position_mm[1]}")  # "=": x may be negative
        if self.model is not None:
            cmd += ["--model", self.model]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        return cmd

    def run(self, hub: Any, collab_id: str, launches: Sequence[PeerLaunch], *, desc: str = "peers") -> None:
        procs = []
        for launch in launches:
            data_file = write_examples(launch.state_dir / "data.jsonl", launch.train)
            log = open(launch.state_dir / "peer.log", "ab")  # noqa: SIM115 - closed below
            procs.append((launch, subprocess.Popen(self.command(collab_id, launch, data_file), stdout=log,
                                                   stderr=subprocess.STDOUT, env={**os.environ, **self.env}), log))  # fmt: skip
        deadline = time.monotonic() + self.timeout
        failed: list[str] = []
        try:
            with tqdm(total=len(procs), desc=desc, disable=not self.progress, leave=False) as bar:
                while not failed and any(proc.poll() is None for _, proc, _ in procs):
                    if time.monotonic() > deadline:
                        failed.append(f"peers still running after {self.timeout:g} s")
                    for launch, proc, _ in procs:
                        code = proc.poll()
                        if code not in (None, 0):  # one peer failed: stop the others (they would wait for it)
                            tail = (launch.state_dir / "peer.log").read_text(errors="replace")[-1500:]
                            failed.append(f"peer {launch.peer_id} exited with {code}:\n{tail}")
                    bar.n = sum(proc.poll() == 0 for _, proc, _ in procs)
                    bar.refresh()
                    time.sleep(0.2)
                for launch, proc, _ in procs:
                    if proc.poll() not in (None, 0) and not any(launch.peer_id in f for f in failed):
                        failed.append(f"peer {launch.peer_id} exited with {proc.returncode}")
        finally:
            for _, proc, log in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                log.close()
        if failed:
            raise RuntimeError("\n".join(failed))


ENGINES = ("local", "processes", "ray")


def make_engine(name: str, **kwargs: Any):
    """The engine ``name`` (one of :data:`ENGINES`) with its settings."""
    if name == "local":
        return InProcessEngine(**{k: kwargs[k] for k in ("base", "tokenizer", "progress")})
    if name == "processes":
        return ProcessEngine(**{k: kwargs[k] for k in ("hub_location", "model", "threads", "progress") if k in kwargs})
    if name == "ray":
        from .ray_engine import RayEngine  # optional extra: fails with a clear message without ray

        return RayEngine(**{k: kwargs[k] for k in ("hub_location", "model", "threads", "progress", "cfg")})
    raise ValueError(f"engine must be one of {ENGINES}, got {name!r}")
