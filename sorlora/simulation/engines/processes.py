"""The process engine: every peer a separate ``sorlora peer`` OS process reading its own data file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ...atomic import write_bytes
from ...data.examples import Example
from .base import PeerLaunch

__all__ = ["ProcessEngine", "write_examples"]


def write_examples(path: Path, examples: Sequence[Example]) -> Path:
    """Write examples as a JSONL data file (``prompt``, ``options``, ``answer``) that ``sorlora peer --data`` reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": e.prompt, "options": list(e.options), "answer": e.label}) for e in examples]
    return write_bytes(path, ("\n".join(lines) + "\n").encode())


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
