"""Command-line gossip: ``status`` of the peers on a hub, ``push``/``pull`` one peer's round, ``hub-serve`` a folder.

The project CLI mounts these with :func:`add_gossip_commands`. ``--hub`` is a folder (LocalHub) or an ``http(s)://``
endpoint (HfHub); a client's token is read from an environment variable (``HF_TOKEN`` by default) and the server's
users and tokens from a file (``--tokens-file``), never from the command line, and are never printed.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

from peft_sorlora import PayloadError

from .hub import EndpointNotSupported, EntryNotFound, HubError, HubServer, load_tokens, open_hub
from .layout import INFO_FILE, ROUND_TAG_RE, UPDATE_FILE, round_tag
from .peer import Peer
from .untrusted import read_json

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
    listed = [p for p in (args.peers or "").split(",") if p]
    if not listed:
        try:
            listed = hub.list_repos()
        except EndpointNotSupported as exc:
            print(f"warning: {exc}; name the peers with --peers", file=sys.stderr)
    rows = []
    for name in listed:
        try:
            repo_id = hub.repo_id(name)
            head = hub.resolve(repo_id)
            tags = sorted(t for t in hub.list_refs(repo_id).tags if ROUND_TAG_RE.fullmatch(t))
        except HubError as exc:
            print(f"warning: {name}: {exc}", file=sys.stderr)
            continue
        try:
            info = read_json(hub, repo_id, INFO_FILE, revision=head)
        except (EntryNotFound, PayloadError):
            info = {}
        info = info if isinstance(info, dict) else {}
        rows.append((repo_id.split("/", 1)[1], head[:12], info.get("round", "-"), len(tags), info.get("bytes", 0),
                     info.get("task") or "-", info.get("cluster", "-")))  # fmt: skip
    print(f"{'peer':<20} {'head':<12} {'round':>5} {'rounds':>6} {'bytes':>10}  task / cluster")
    for peer, head, last, count, nbytes, task, cluster in rows:
        print(f"{peer:<20} {head:<12} {last!s:>5} {count:>6} {nbytes!s:>10}  {task!s} / {cluster!s}")
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
            target = out / f"{neighbour.replace('/', '--')}.{round_tag(args.round)}.safetensors"
            target.write_bytes(peer.hub.read_bytes(peer.hub.repo_id(neighbour), UPDATE_FILE, revision=revision))
            line += f" -> {target}"
        print(line)
    for neighbour, reason in pull.skipped.items():
        print(f"{neighbour}: skipped ({reason})")
    for rejection in pull.rejected.values():
        print(f"rejected {rejection}")
    return 0 if pull.updates or not neighbours else 1


def _serve(args: argparse.Namespace) -> int:
    tokens: dict[str, str] = {}
    try:
        if args.tokens_file:
            tokens = load_tokens(args.tokens_file)
        if args.require_token:
            token = os.environ.get(args.token_env)
            if not token:
                print(f"--require-token needs ${args.token_env} set", file=sys.stderr)
                return 2
            tokens.setdefault(args.namespace, token)
        server = HubServer(args.root, host=args.host, port=args.port, namespace=args.namespace, tokens=tokens,
                           private=args.private, max_body_bytes=args.max_body_mb << 20,
                           request_timeout=args.request_timeout, max_connections=args.max_connections)  # fmt: skip
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:  # the sorlora CLI turns this into one line: "choose another --port"
            raise
        print(f"hub-serve: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"hub-serve: {exc}", file=sys.stderr)
        return 2
    users = f"{len(tokens)} user(s)" if tokens else "open (no tokens: loopback only)"
    print(f"serving {Path(args.root).resolve()} at {server.endpoint}, {users} (Ctrl-C to stop)", flush=True)
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
    status.add_argument("--peers", default=None, help="comma-separated peer ids or repo ids to show (default: every "
                        "repo of the namespace, where the endpoint can list them)")  # fmt: skip
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
    pull.add_argument("--neighbours", required=True, help="comma-separated peer ids or full repo ids (user/peer)")
    pull.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for late neighbours")
    pull.add_argument("--out", default=None, help="folder to write the pulled payloads to")
    pull.set_defaults(func=_pull)

    serve = subparsers.add_parser("hub-serve", help="serve a LocalHub folder over the Hugging Face Hub HTTP API")
    serve.add_argument("--root", default=os.environ.get("SORLORA_HUB", "hub"),
                       help="LocalHub folder to serve, created if missing (default: $SORLORA_HUB or ./hub)")  # fmt: skip
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1, this machine); any other needs --tokens-file")  # fmt: skip
    serve.add_argument("--port", type=int, default=8088, help="TCP port to listen on (default: 8088; 0: any free port)")
    serve.add_argument("--namespace", default="gossip",
                       help="namespace of repos created without one in open mode (default: gossip)")  # fmt: skip
    serve.add_argument("--tokens-file", default=None, metavar="FILE",
                       help="JSON file {user: token}: each user writes its own namespace (and its member files in "
                       "collaborations that admit it); anonymous clients only read. Tokens never go on the "
                       "command line")  # fmt: skip
    serve.add_argument("--private", action="store_true", help="reads need a token too")
    serve.add_argument("--max-body-mb", type=int, default=512, help="largest request body (a commit) in MiB")
    serve.add_argument("--request-timeout", type=float, default=30.0,
                       help="seconds a silent connection is kept open (default: 30)")  # fmt: skip
    serve.add_argument("--max-connections", type=int, default=128,
                       help="connections served at once; beyond, clients get 503 and retry (default: 128)")  # fmt: skip
    serve.add_argument("--token-env", default="HF_TOKEN",
                       help="environment variable holding the token for --require-token (default: HF_TOKEN)")  # fmt: skip
    serve.add_argument("--require-token", action="store_true",
                       help="add one user, --namespace, whose token is in $TOKEN_ENV (prefer --tokens-file)")  # fmt: skip
    serve.set_defaults(func=_serve)
