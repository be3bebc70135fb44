"""``sorlora collab create|status`` and ``sorlora peer``: take part in a collaboration from one device.

``--hub`` is a folder (LocalHub), a ``sorlora hub-serve`` URL or a Hub endpoint (``https://huggingface.co``); the
token is read from an environment variable (``HF_TOKEN`` by default), never from the command line, never printed.
The project CLI mounts these with :func:`add_collab_commands`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["add_collab_commands", "load_peer_data"]


def _hub_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hub",
        default=os.environ.get("SORLORA_HUB", "hub"),
        help="hub folder, `sorlora hub-serve` URL or Hub endpoint (default: $SORLORA_HUB or ./hub)",
    )
    parser.add_argument("--collab", required=True, metavar="NS/NAME", help="the collaboration repo id")
    parser.add_argument("--token-env", default="HF_TOKEN", metavar="VAR",
                        help="environment variable holding your Hub token (default: HF_TOKEN)")  # fmt: skip


def _open(args: argparse.Namespace, namespace: str | None = None):
    from sorlora_gossip.hub import open_hub

    return open_hub(args.hub, namespace=namespace, token=os.environ.get(args.token_env) or None)


def load_peer_data(data: str | None, task: str | None, *, test_share: float = 0.0, seed: int = 0):
    """:func:`~sorlora.data.registry.member_task` as the program's :class:`~sorlora.protocol.program.PeerData`
    (train, held-out test)."""
    from ..data.registry import member_task
    from ..protocol.program import PeerData

    split = member_task(data, task, test_share=test_share, seed=seed)
    return PeerData(task=split.name, train=split.train, test=split.test)


def _create(args: argparse.Namespace) -> int:
    from peft_sorlora.base_model import BUNDLED_BASE_ID, base_fingerprint
    from sorlora_gossip.hub import HubAuthError

    from ..protocol.collab import Collaboration, create_collaboration
    from ..protocol.terms import CollabTerms, TermsError
    from .errors import UsageError

    try:
        terms = json.loads(Path(args.config).read_text())
    except json.JSONDecodeError as exc:
        raise TermsError(f"{args.config}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(terms, dict):
        terms.setdefault("base_model", BUNDLED_BASE_ID)
    # everything that needs no model first, so that a typo or a taken id is one line, not one line after a model load
    CollabTerms.from_dict({"base_fingerprint": "0" * 16, **terms}, source=args.config)
    hub = _open(args)
    if hub.repo_exists(args.collab) and not args.exist_ok:
        try:
            Collaboration(hub, args.collab).terms()
        except TermsError:
            pass  # a repo without terms: create_collaboration writes them
        else:
            raise TermsError(f"collaboration {args.collab} exists already (--exist-ok accepts it when its terms are "
                             "equal)")  # fmt: skip
    try:  # the token may write there: a missing token or a wrong namespace is refused here
        hub.create_repo(args.collab, exist_ok=True)
    except HubAuthError as exc:
        raise UsageError(_write_refused(args.token_env, f"the collaboration {args.collab}", exc)) from None
    if "base_fingerprint" not in terms:
        from ..runtime.model_loading import load_base

        terms["base_fingerprint"] = base_fingerprint(load_base(terms["base_model"], model=args.model)[0])
    if args.host_base:  # the base once, in the collaboration's namespace: what members publish names it
        from ..protocol.publish import host_base

        terms["base_repo"] = host_base(hub, args.collab, terms["base_model"], terms["base_fingerprint"],
                                       model=args.model)  # fmt: skip
        print(f"base {terms['base_model']} hosted at {terms['base_repo']}")
    pinned = CollabTerms.from_dict(terms, source=args.config)
    create_collaboration(hub, args.collab, pinned, exist_ok=args.exist_ok)
    print(f"collaboration {args.collab}: terms {pinned.sha256()[:12]} ({pinned.method}, {pinned.max_members} members, "
          f"{pinned.rounds} rounds, base {pinned.base_model})")  # fmt: skip
    return 0


def _terms(args: argparse.Namespace) -> int:
    from ..fields import fields_help
    from ..protocol.terms import CollabTerms

    print("terms of a collaboration (the keys of `collab create --config`'s JSON object):")
    print(fields_help(CollabTerms))
    return 0


def _status(args: argparse.Namespace) -> int:
    from ..protocol.collab import collab_status

    status = collab_status(_open(args), args.collab)
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    print(
        f"collaboration {status['collab']}: {status['method']}, terms {status['terms_sha256'][:12]}, "
        f"{len(status['members'])}/{status['max_members']} members, registration {status['registration']}"
    )
    plan = status["plan"]
    if plan:
        print(
            f"plan {plan['plan_sha256'][:12]}: clusters "
            + "  ".join("[" + ", ".join(c) + "]" for c in plan["clusters"])
        )
    print(f"{'peer':<32} {'task':<24} {'n':>5} {'round':>5}/{status['rounds'] - 1} {'bytes':>10} {'skips':>5}  final")
    for m in status["members"]:
        print(f"{m['peer']:<32} {m['task']:<24} {m['n_train']:>5} {m['round']!s:>5}   {m['bytes_pushed']:>10} "
              f"{m['skipped']:>5}  {'yes' if m['final'] else 'no'}")  # fmt: skip
    moes = sorted({m["moe"] for m in status["members"] if m.get("moe")})
    if moes:  # one, unless a member built another MoE (its report says why)
        print(f"implicit MoE: {', '.join(moes)}")
    for m in status["members"]:
        if m.get("unreadable"):
            print(f"unreadable {m['peer']}: {m['unreadable']}")
    for path, why in status["refused"].items():
        print(f"refused {path}: {why}")
    return 0


def _peer(args: argparse.Namespace) -> int:
    import torch

    from sorlora_gossip.hub import HubAuthError

    from ..protocol.claim import PeerClaim, lock_state_dir
    from ..protocol.collab import Collaboration
    from ..protocol.program import PeerProgram
    from ..protocol.state import write_state
    from .errors import UsageError

    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_peer_data(args.data, args.task)  # the file is checked first; split once the terms are known
    if args.task is None:  # the registration and the cards publish the task's name: say which one was taken
        print(f"task: {data.task!r}, the data file's name (--task NAME publishes another)", file=sys.stderr)
    hub = _open(args, namespace=args.peer_id.split("/")[0] if "/" in args.peer_id else None)
    peer_id = args.peer_id if "/" in args.peer_id else f"{hub.namespace}/{args.peer_id}"
    position = None
    if args.position_mm:
        x, _, y = args.position_mm.partition(",")
        position = (int(x), int(y))
    state_dir = Path(args.state_dir or Path("sorlora-peers") / peer_id.replace("/", "__"))
    # Pre-flight, before the model loads: one copy per state directory and per peer id, the collaboration and its
    # terms, registration still open (or this peer a member), the token allowed to write the peer's repo.
    terms = Collaboration(hub, args.collab).terms()  # a missing collaboration: one line, and no state directory
    with lock_state_dir(state_dir, peer_id):
        data = load_peer_data(args.data, args.task, test_share=terms.test_share, seed=terms.seed)
        program = PeerProgram(hub=hub, collab_id=args.collab, peer_id=peer_id,
                              data=data, state_dir=state_dir,
                              model=args.model, position_mm=position, expected_terms=args.terms_sha,
                              poll_interval=args.poll_interval, progress=not args.no_progress)  # fmt: skip
        program.preflight()
        claim = PeerClaim(hub, args.collab, peer_id, state_dir)
        if not program.done:
            try:
                hub.create_repo(hub.repo_id(peer_id), exist_ok=True)
            except HubAuthError as exc:
                raise UsageError(_write_refused(args.token_env, f"the peer repo {peer_id}", exc)) from None
            claim.acquire()
        print(f"peer {peer_id} in {args.collab}: state in {state_dir} (run the same command again to resume)",
              flush=True)  # fmt: skip
        try:
            program.run(max_seconds=args.max_seconds, heartbeat=claim.renew)
        except KeyboardInterrupt:
            print(f"interrupted in phase {program.phase}; run the same command to resume")
            return 130
        print(f"peer {peer_id}: done ({terms.rounds} rounds); final adapter at {peer_id}@final")
        if "heldout" not in program.state and program.data.test and hasattr(program, "ws"):
            from .eval import member_scores, publish_member_scores

            scores = member_scores(program)
            publish_member_scores(hub, peer_id, program.data.task, scores)  # report.json and card on main
            program.state["heldout"] = scores
            write_state(state_dir, program.state)
        if "heldout" in program.state:
            from .eval import print_member_scores

            print_member_scores(peer_id, program.state["heldout"])
    return 0


def _write_refused(token_env: str, what: str, exc: Exception) -> str:
    """The line for a hub that refuses a write: no token set, or the token may not write there (namespace)."""
    if not os.environ.get(token_env):
        return f"the hub needs a token to write {what} and ${token_env} is not set ({exc}): export {token_env}=..."
    return f"the hub refused the token in ${token_env} writing {what} ({exc}): check the token and the namespace"


def _terms_sha(text: str) -> str:
    value = text.strip().lower()
    if not 12 <= len(value) <= 64 or any(c not in "0123456789abcdef" for c in value):
        raise argparse.ArgumentTypeError(f"expected 12 to 64 hex digits of the terms' sha256, got {text!r}")
    return value


def add_collab_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``collab create``, ``collab status`` and ``peer`` to an argparse subparsers object (each sets ``func``)."""
    collab = subparsers.add_parser("collab", help="create or inspect a collaboration repo")
    sub = collab.add_subparsers(dest="collab_command", required=True)
    from ..fields import fields_help
    from ..protocol.terms import CollabTerms

    create = sub.add_parser("create", help="write the pinned terms of a new collaboration",
                            description="Write the pinned terms (collab.json) of a new collaboration repo.",
                            epilog="terms (the keys of --config's JSON object):\n" + fields_help(CollabTerms),
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    _hub_arguments(create)
    create.add_argument("--config", required=True, metavar="TERMS.json",
                        help="JSON object of the terms listed below; base_fingerprint is computed from the base when "
                        "missing")  # fmt: skip
    create.add_argument("--model", default=None, metavar="PATH_OR_ID", help="local copy of the base to fingerprint")
    create.add_argument("--exist-ok", action="store_true", help="accept an existing collaboration with equal terms")
    create.add_argument("--host-base", action="store_true",
                        help="push the pinned base (weights, config, tokenizer) once to NS/<name>-base on this hub and "
                        "pin it as the term base_repo: the members' adapters and the MoE then load with only "
                        "HF_ENDPOINT (+ token) set")  # fmt: skip
    create.set_defaults(func=_create)
    status = sub.add_parser("status", help="members, plan, each member's round, bytes and skips")
    _hub_arguments(status)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=_status)
    terms = sub.add_parser("terms", help="every term with its type, default and meaning")
    terms.set_defaults(func=_terms)

    peer = subparsers.add_parser("peer", help="run one device's whole collaboration (resumable)")
    _hub_arguments(peer)
    peer.add_argument(
        "--peer-id",
        required=True,
        metavar="[USER/]NAME",
        help="your peer repo (default user: the token's owner, or the folder hub's namespace)",
    )
    peer.add_argument(
        "--data",
        default=None,
        metavar="FILE",
        help="JSONL or CSV of multiple-choice items: prompt, options, answer (index)",
    )
    peer.add_argument("--task", default=None, metavar="NAME", help="task name (or a registry task without --data)")
    peer.add_argument(
        "--model",
        default=None,
        metavar="PATH_OR_ID",
        help="local copy or Hub id of the pinned base (checked against its weights fingerprint)",
    )
    peer.add_argument("--state-dir", default=None, help="local state for resuming (default ./sorlora-peers/<id>)")
    peer.add_argument("--position-mm", default=None, metavar="X,Y", help="position estimate for the channel model")
    peer.add_argument("--terms-sha", default=None, type=_terms_sha, metavar="HEX",
                      help="refuse to take part unless the terms have this sha256 (whole, or the first 12+ hex digits "
                      "that `collab create` prints)")  # fmt: skip
    peer.add_argument("--poll-interval", type=float, default=0.5, help="seconds between polls while waiting")
    peer.add_argument("--max-seconds", type=float, default=None, help="give up after this long waiting")
    peer.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    peer.add_argument("--no-progress", action="store_true", help="no progress bars")
    peer.set_defaults(func=_peer)
