"""Memory under hostile load: a neighbour publishing a 2 GiB file, and 300 idle connections to ``hub-serve``.

``hub-serve`` runs as its own OS process (``python -m sorlora hub-serve``); its resident memory is read from
``/proc``, the puller's with :class:`benchmarks.common.PeakRSS`. Figures, each against its anchor measured in the
same run (bytes of RSS growth, lower is better):

- ``pull_2gib_neighbour``: a receiver pulling a round in which one neighbour published a 2 GiB ``update.safetensors``
  (a sparse file: no RAM is spent making it), against ``pull_honest`` (the same round, honest neighbours only). The
  file is refused from its size before any byte moves.
- ``serve_2gib_stream``: the server's RSS growth while a client streams the whole 2 GiB file from it, against
  ``serve_small_file`` (a 1 MiB file): files are streamed from their blobs, never held.
- ``idle_300``: the server's whole RSS with 300 connections opened and left silent, against ``at_rest`` (its RSS
  before); connections beyond ``--max-connections`` get a quick 503, silent ones are closed after
  ``--request-timeout``.

Quick mode: a 64 MiB file and 30 connections.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx

from sorlora_gossip import HfHub, LocalHub, Peer
from sorlora_gossip.layout import INFO_FILE, UPDATE_FILE, round_tag

from .common import PeakRSS, constant, rows_against

__all__ = ["ENTRY", "HubProcess", "idle_connections", "publish_big_round", "run", "stream_file"]

ENTRY = "hub_memory"
REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


class HubProcess:
    """``python -m sorlora hub-serve`` on a free 127.0.0.1 port, as a context manager; :meth:`rss` reads its RSS."""

    def __init__(self, root: Path, *, request_timeout: float = 5.0, max_connections: int = 128) -> None:
        self.root, self.request_timeout, self.max_connections = root, request_timeout, max_connections
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    def __enter__(self) -> HubProcess:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sorlora", "hub-serve", "--root", str(self.root), "--port", "0",
             "--request-timeout", str(self.request_timeout), "--max-connections", str(self.max_connections)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT,
        )  # fmt: skip
        line = self.proc.stdout.readline()
        if " at http://" not in line:
            self.proc.kill()
            raise RuntimeError(f"hub-serve did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.endpoint = line.split(" at ", 1)[1].split(",", 1)[0].split()[0]
        return self

    def rss(self) -> int:
        """The server process's resident set size in bytes."""
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def threads(self) -> int:
        """Threads of the server process (one per connection being served, plus the acceptor)."""
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _peak(sample, action) -> int:
    """Peak of ``sample()`` (polled every 5 ms) while ``action()`` runs, minus its value before."""
    baseline = peak = sample()
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sample())
            done.wait(0.005)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        action()
    finally:
        done.set()
        thread.join()
    return max(0, max(peak, sample()) - baseline)


def publish_big_round(hub: LocalHub, peer: str, round: int, size: int, folder: Path) -> str:
    """``peer`` publishes a sparse ``size``-byte file as its ``round`` payload, with a peer.json claiming it."""
    big = folder / "big.bin"
    with big.open("wb") as out:
        out.truncate(size)  # a sparse file: nothing allocated in RAM or on disk
    repo = hub.repo_id(peer)
    info = json.loads(hub.read_bytes(repo, INFO_FILE, revision=round_tag(0)))
    info.update(round=round, bytes=size, sha256=hashlib.sha256(b"").hexdigest())
    sha = hub.create_commit(repo, {UPDATE_FILE: big, INFO_FILE: json.dumps(info).encode()},
                            commit_message=f"{peer}: {round_tag(round)}")  # fmt: skip
    hub.create_tag(repo, round_tag(round), revision=sha)
    big.unlink()
    return sha


def stream_file(endpoint: str, repo_id: str, filename: str, revision: str) -> int:
    """A plain client streaming a file from ``endpoint`` and dropping it; returns the bytes received."""
    received = 0
    with httpx.stream("GET", f"{endpoint}/{repo_id}/resolve/{revision}/{filename}", timeout=60) as answer:
        answer.raise_for_status()
        for chunk in answer.iter_bytes(MiB):
            received += len(chunk)
    return received


def idle_connections(endpoint: str, count: int) -> list[socket.socket]:
    """Open ``count`` connections and send half a request line on each, then leave them silent."""
    host, port = endpoint.removeprefix("http://").split(":")
    sockets = []
    for _ in range(count):
        conn = socket.create_connection((host, int(port)), timeout=10)
        conn.sendall(b"GET /api/models/gossip/x HTTP/1.1\r\n")
        sockets.append(conn)
    return sockets


def _world(root: Path, size: int):
    """Three peers on a LocalHub folder (``me``, ``good``, ``evil``), round 0 and good's round 1 pushed, evil's
    round 1 a ``size``-byte sparse file."""
    sys.path.insert(0, str(REPO_ROOT))
    from tests.gossip_payloads import calibrated_mlp, update_for_round  # the same tiny real SO-LoRA payloads

    hub = LocalHub(root, namespace="gossip")
    models = {p: calibrated_mlp(slot=i, seed=i) for i, p in enumerate(["me", "good", "evil"])}
    for i, p in enumerate(models):
        Peer(hub, p).push_round(0, update_for_round(models[p], 0, seed=i))
    Peer(hub, "good").push_round(1, update_for_round(models["good"], 1, seed=1))
    sha = publish_big_round(hub, "evil", 1, size, root.parent)
    return hub, sha


def run(repeats: int = 5, quick: bool = False) -> list[dict]:
    size, idle = (64 * MiB, 30) if quick else (2048 * MiB, 300)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "hub"
        hub, sha = _world(root, size)
        small = hub.create_commit(hub.repo_id("good"), {"small.bin": os.urandom(MiB)}, commit_message="small")
        with HubProcess(root, request_timeout=5.0) as server:
            client = HfHub(server.endpoint, namespace="gossip", cache_dir=Path(folder) / "cache")
            me = Peer(client, "me")
            me.last_pushed_round()
            pulls = {}
            for name, neighbours in (("pull_honest", ["good"]), ("pull_2gib_neighbour", ["good", "evil"])):
                deltas = []
                for _ in range(repeats):
                    Path(folder, "cache").exists() and _clear(Path(folder) / "cache")
                    with PeakRSS() as peak:
                        pull = Peer(client, "me").pull_round(1, neighbours, timeout=10)
                    deltas.append(peak.delta)
                    assert "good" in pull.updates and "evil" not in pull.updates
                pulls[name] = constant(sorted(deltas)[len(deltas) // 2])
            serve = {
                "serve_small_file": constant(_peak(server.rss, lambda: stream_file(server.endpoint, "gossip/good",
                                                                                   "small.bin", small))),
                "serve_2gib_stream": constant(_peak(server.rss, lambda: stream_file(server.endpoint, "gossip/evil",
                                                                                    UPDATE_FILE, sha))),
            }  # fmt: skip
            time.sleep(0.3)
            at_rest = server.rss()
            many = idle_connections(server.endpoint, idle)
            time.sleep(0.5)
            idle_n, threads = server.rss(), server.threads()
            for conn in many:
                conn.close()
    note = f"{size // MiB} MiB file refused from its size before any byte moved"
    rows = rows_against(ENTRY, pulls, anchor="pull_honest", unit="B", group="pull", params={"file_mib": size // MiB},
                        notes={"pull_2gib_neighbour": note},
                        worse_notes={"pull_2gib_neighbour": note + "; the difference is allocator noise"})  # fmt: skip
    rows += rows_against(ENTRY, serve, anchor="serve_small_file", unit="B", group="serve",
                         params={"file_mib": size // MiB},
                         worse_notes={"serve_2gib_stream": f"{size // MiB} MiB streamed in 1 MiB chunks; the growth "
                                      "is socket and page-cache bookkeeping, not the file"})  # fmt: skip
    rows += rows_against(ENTRY, {"at_rest": constant(at_rest), f"idle_{idle}": constant(idle_n)},
                         anchor="at_rest", unit="B", group="idle", params={"connections": idle, "threads": threads},
                         worse_notes={f"idle_{idle}": f"one thread per served connection ({threads} threads; at most "
                                      "128, closed after the request timeout)"})  # fmt: skip
    return rows


def _clear(cache: Path) -> None:
    for path in sorted(cache.rglob("*"), reverse=True):
        if path.is_file():
            path.chmod(0o644)
            path.unlink()
        elif path.is_dir():
            path.rmdir()
