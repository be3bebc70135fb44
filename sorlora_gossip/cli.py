"""Command-line gossip: ``status`` of the peers on a hub, ``push``/``pull`` one peer's round, ``hub-serve`` a folder.

The project CLI mounts these with :func:`add_gossip_commands`. ``--hub`` is a folder (LocalHub) or an ``http(s)://``
endpoint (HfHub); the token is read from an environment variable (``HF_TOKEN`` by default), never from the command
line, and is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

from .hub import EntryNotFound, HubServer, open_hub
from .peer import INFO_FILE, Peer

__all__ = ["add_gossip_commands"]


def _hub_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hub", default=os.environ.get("SORLORA_HUB", "hub"),
                        help="hub folder or http(s):// endpoint (default: $SORLORA_HUB or ./hub)")  # fmt: skip
    parser.add_argument("--namespace", default=None, help="owner of the peer repos (default: gossip / token user)")
    parser.add_argument("--token-env", default="HF_TOKEN", help="environment variable holding the Hub token")


def _open(args: argparse.Namespace, *, must_exist: bool = True):
    """The ``--hub`` of a command; a folder that does not exist is refused (reads must not create an empty hub)."""
    location = str(args.hub)
    if must_exist and "://" not in location and not Path(location).is_dir():
        raise FileNotFoundError(f"no hub folder {location!r}: give an existing hub folder or an http(s):// endpoint")
    return open_hub(location, namespace=args.namespace, token=os.environ.get(args.token_env) or None)


def _status(args: argparse.Namespace) -> int:
    hub = _open(args)
    rows = []
    for repo_id in hub.list_repos():
        head = hub.resolve(repo_id)
        tags = sorted(t for t in hub.list_refs(repo_id).tags if t.startswith("round-"))
        try:
            info = json.loads(hub.read_bytes(repo_id, INFO_FILE, revision=head))
        except (EntryNotFound, ValueError):
            info = {}
        rows.append((repo_id.split("/", 1)[1], head[:12], info.get("round", "-"), len(tags), info.get("bytes", 0),
                     info.get("task") or "-", info.get("cluster", "-")))  # fmt: skip
    print(f"{'peer':<20} {'head':<12} {'round':>5} {'rounds':>6} {'bytes':>10}  task / cluster")
    for peer, head, last, count, nbytes, task, cluster in rows:
        print(f"{peer:<20} {head:<12} {last!s:>5} {count:>6} {nbytes:>10}  {task} / {cluster}")
    print(f"{len(rows)} peer(s) on {hub!r}")
    return 0


def _push(args: argparse.Namespace) -> int:
    data = Path(args.payload).read_bytes()  # validated by Peer.push_round, pushed byte for byte
    metrics = {k: float(v) for k, v in (m.split("=", 1) for m in args.metric)}
    peer = Peer(_open(args, must_exist=False), args.peer, task=args.task, cluster=args.cluster)
    with tqdm(total=len(data), unit="B", unit_scale=True, desc=f"push {args.peer} round {args.round}") as bar:
        result = peer.push_round(args.round, data, metrics=metrics)
        bar.update(len(data))
    state = "pushed" if result.created else "already on the hub"
    print(f"{args.peer} round {result.round}: {state} as {result.sha} ({result.bytes} bytes)")
    return 0


def _pull(args: argparse.Namespace) -> int:
    neighbours = [n for n in args.neighbours.split(",") if n]
    peer = Peer(_open(args), args.peer)
    peer.last_pushed_round()  # adopt this peer's base model / config hash to check its neighbours against
    with tqdm(total=len(neighbours), unit="peer", desc=f"pull round {args.round}") as bar:
        received = {"bytes": 0}

        def progress(neighbour: str, nbytes: int) -> None:
            received["bytes"] += nbytes
            bar.set_postfix(peer=neighbour, bytes=received["bytes"])
            bar.update(1)

        pull = peer.pull_round(args.round, neighbours, timeout=args.timeout, progress=progress)
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for neighbour, revision in pull.revisions.items():
        line = f"{neighbour}: {revision} ({pull.bytes[neighbour]} bytes)"
        if out is not None:
            target = out / f"{neighbour}.round-{args.round:04d}.safetensors"
            target.write_bytes(peer.hub.read_bytes(peer.hub.repo_id(neighbour), "update.safetensors",
                                                   revision=revision))  # fmt: skip
            line += f" -> {target}"
        print(line)
    for neighbour, reason in pull.skipped.items():
        print(f"{neighbour}: skipped ({reason})")
    for rejection in pull.rejected.values():
        print(f"rejected {rejection}")
    return 0 if pull.updates or not neighbours else 1


def _serve(args: argparse.Namespace) -> int:
    token = os.environ.get(args.token_env) if args.require_token else None
    if args.require_token and not token:
        print(f"--require-token needs ${args.token_env} set", file=sys.stderr)
        return 2
    server = HubServer(args.root, host=args.host, port=args.port, namespace=args.namespace, token=token)
    print(f"serving {Path(args.root).resolve()} at {server.endpoint} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def add_gossip_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``status``, ``push``, ``pull`` and ``hub-serve`` to an argparse subparsers object (each sets ``func``)."""
    status = subparsers.add_parser("status", help="peers on a hub: heads, rounds, bytes")
    _hub_arguments(status)
    status.set_defaults(func=_status)

    push = subparsers.add_parser("push", help="push one peer's round payload (update.safetensors)")
    _hub_arguments(push)
    push.add_argument("--peer", required=True, help="peer id (its repo is NAMESPACE/PEER)")
    push.add_argument("--round", type=int, required=True, help="round number (0 first; tagged round-NNNN)")
    push.add_argument("--payload", required=True, help="a peft_sorlora sparse update (.safetensors)")
    push.add_argument("--task", default=None, help="the peer's task, recorded in peer.json and its card")
    push.add_argument("--cluster", default=None, help="the peer's cluster, recorded in peer.json and its card")
    push.add_argument("--metric", action="append", default=[], metavar="NAME=VALUE", help="local metric (repeat)")
    push.set_defaults(func=_push)

    pull = subparsers.add_parser("pull", help="pull the neighbours' revisions of one round for a peer")
    _hub_arguments(pull)
    pull.add_argument("--peer", required=True, help="the pulling peer's id (its base model and config are checked)")
    pull.add_argument("--round", type=int, required=True, help="round whose neighbour revisions to pull")
    pull.add_argument("--neighbours", required=True, help="comma-separated peer ids")
    pull.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for late neighbours")
    pull.add_argument("--out", default=None, help="folder to write the pulled payloads to")
    pull.set_defaults(func=_pull)

    serve = subparsers.add_parser("hub-serve", help="serve a LocalHub folder over the Hugging Face Hub HTTP API")
    serve.add_argument("--root", default=os.environ.get("SORLORA_HUB", "hub"),
                       help="LocalHub folder to serve, created if missing (default: $SORLORA_HUB or ./hub)")  # fmt: skip
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    serve.add_argument("--port", type=int, default=8088, help="TCP port to listen on (default: 8088; 0: any free port)")
    serve.add_argument("--namespace", default="gossip", help="owner of the served peer repos (default: gossip)")
    serve.add_argument("--token-env", default="HF_TOKEN",
                       help="environment variable holding the token for --require-token (default: HF_TOKEN)")  # fmt: skip
    serve.add_argument("--require-token", action="store_true",
                       help="writes need 'Authorization: Bearer <token>' with the token in $TOKEN_ENV")  # fmt: skip
    serve.set_defaults(func=_serve)
