"""The on-hub layout of a collaboration: which repo holds which file, and who may write it.

Two kinds of repo take part (``../shared/docs/protocol.md``):

- a **peer repo** ``USER/PEER`` in its owner's namespace: one commit per round holding :data:`UPDATE_FILE`,
  :data:`INFO_FILE` and the card :data:`CARD_FILE`, tagged :func:`round_tag`; only its owner writes it;
- a **collaboration repo** ``NS/NAME``: :data:`COLLAB_FILE` (the pinned terms, written once by its creator),
  one registration per member at :func:`member_path` (each written only by that member's user) and
  :data:`PLAN_FILE` (written once, by the first member to commit it: a cache nobody is bound by, every member
  computes its own).

At the end a peer's repo gets one more commit, tagged :data:`FINAL_TAG`: its final own part :data:`EXPERT_FILE`, its
:data:`REPORT_FILE`, its PEFT adapter and, where its final model needs them, the neighbours' parts under
:data:`NEIGHBOURHOOD_DIR`. A collaboration of the MoE method has ONE implicit MoE, :func:`moe_repo_name` in the namespace of
the member that claimed it first (a claim is :func:`moe_claim_path`, in commit order; see
:mod:`sorlora.protocol.publish`); a collaboration may host its base once as :func:`base_repo_name`.

A peer is identified by its full repo id; a registration names it. ``hub-serve`` enforces the write rules above
(:func:`collab_write_allowed`), as the real Hub's namespace permissions do for peer repos.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from huggingface_hub.constants import REPOCARD_NAME
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from peft_sorlora.exchange import PayloadError, parse_json

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "ADMITTED_KEY",
    "CARD_FILE",
    "COLLAB_FILE",
    "EXPERT_FILE",
    "FINAL_TAG",
    "INFO_FILE",
    "INFO_FORMAT",
    "MAX_INFO_BYTES",
    "MAX_REPORT_BYTES",
    "MEMBERS_DIR",
    "MOE_CLAIM_SUFFIX",
    "NEIGHBOURHOOD_DIR",
    "PLAN_FILE",
    "REPORT_FILE",
    "ROUND_TAG_RE",
    "UPDATE_FILE",
    "check_history",
    "check_metrics",
    "collab_write_allowed",
    "base_repo_name",
    "member_file",
    "member_path",
    "moe_claim_path",
    "moe_repo_name",
    "parse_peer_info",
    "peer_identity",
    "round_tag",
]

UPDATE_FILE = "update.safetensors"
INFO_FILE = "peer.json"
INFO_FORMAT = "sorlora-peer/1"
CARD_FILE = REPOCARD_NAME  # the adapter card, where the Hub shows it
ADAPTER_CONFIG_FILE = CONFIG_NAME  # what PeftModel.save_pretrained writes and from_pretrained reads
ADAPTER_WEIGHTS_FILE = SAFETENSORS_WEIGHTS_NAME
MAX_INFO_BYTES = 1 << 20
MAX_REPORT_BYTES = 64 << 20  # a member's final report.json: its records and decisions of every round

COLLAB_FILE = "collab.json"
PLAN_FILE = "plan.json"
MEMBERS_DIR = "members"
ADMITTED_KEY = "admitted"  # in collab.json: null (any authenticated user) or a list of user names

ROUND_TAG_RE = re.compile(r"round-\d{4,}")

FINAL_TAG = "final"  # a peer's final revision
EXPERT_FILE = "expert.safetensors"  # the peer's final own part with its structure (a payload, validated on read)
REPORT_FILE = "report.json"  # what the peer did: losses, bytes, neighbours used or skipped, per round
NEIGHBOURHOOD_DIR = "neighbourhood"  # <dir>/<adapter name>.safetensors: a neighbour's part of a peer's final view


def moe_repo_name(collab_name: str) -> str:
    """The name of the repo holding collaboration ``collab_name``'s implicit MoE (``<collab name>-moe``), created in
    the namespace of the member whose claim comes first (users create repos only in their own namespace)."""
    return f"{collab_name}-moe"


MOE_CLAIM_SUFFIX = ".moe-claim"


def moe_claim_path(user: str, peer: str) -> str:
    """Where member ``user/peer`` claims the collaboration's MoE (the repo it publishes or uses, and the content
    hash it would build): ``members/<user>/<peer>.moe-claim``. Not ``.json`` (never read as a registration), and no
    other member file ends so (``.claim`` is a running copy's claim of its peer id)."""
    return member_file(user, peer, MOE_CLAIM_SUFFIX)


def base_repo_name(collab_name: str) -> str:
    """The name of the repo (in the collaboration's namespace) where ``collab create --host-base`` puts the pinned
    base model as a plain transformers repo (weights, config, tokenizer): ``<collab name>-base``."""
    return f"{collab_name}-base"


def round_tag(round: int) -> str:
    """The tag naming a peer's revision for ``round`` (``round-0007``)."""
    if not isinstance(round, int) or isinstance(round, bool) or round < 0:
        raise ValueError(f"round must be a non-negative integer, got {round!r}")
    return f"round-{round:04d}"


def member_file(user: str, peer: str, suffix: str) -> str:
    """A file member ``user/peer`` keeps in a collaboration repo: ``members/<user>/<peer><suffix>`` (its registration
    ``.json``, task statistics, centroids, claims, deadline marker: every one under the member's own prefix, the only
    files its user may write there)."""
    return f"{MEMBERS_DIR}/{user}/{peer}{suffix}"


def member_path(user: str, peer: str) -> str:
    """Where user ``user`` registers its peer ``peer`` in a collaboration repo: ``members/<user>/<peer>.json``."""
    return member_file(user, peer, ".json")


def collab_write_allowed(user: str, paths: list[str], *, plan_exists: bool) -> bool:
    """Whether ``user`` (admitted to the collaboration) may commit ``paths`` to a collaboration repo it does not own:
    only its own registrations, and the plan while there is none yet."""
    own = f"{MEMBERS_DIR}/{user}/"
    return bool(paths) and all(p.startswith(own) or (p == PLAN_FILE and not plan_exists) for p in paths)


def peer_identity(peer_id: str, repo_id: str) -> str:
    """The full repo id a ``peer.json``'s ``peer_id`` names, read inside ``repo_id``: a full id (``ns/name``)
    names itself, a bare name is in the repo's namespace."""
    return peer_id if "/" in peer_id else f"{repo_id.split('/')[0]}/{peer_id}"


def parse_peer_info(data: bytes, *, repo_id: str, round: int | None = None) -> dict:
    """Parse and check a ``peer.json`` (size-capped, recursion-safe JSON): format tag, that it names the peer
    owning ``repo_id`` (see :func:`peer_identity`), round, byte count and checksum fields; :class:`PayloadError`."""
    info = parse_json(data, max_bytes=MAX_INFO_BYTES, what=INFO_FILE)
    if not isinstance(info, dict) or info.get("format") != INFO_FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise PayloadError(f"{INFO_FILE} has format {found!r}, expected {INFO_FORMAT!r}")
    peer_id = info.get("peer_id")
    if not isinstance(peer_id, str) or peer_identity(peer_id, repo_id) != repo_id:
        raise PayloadError(f"{INFO_FILE} names peer {peer_id!r}, not the owner of {repo_id!r}")
    value = info.get("round")
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (round is not None and value != round):
        raise PayloadError(f"{INFO_FILE} is for round {value!r}, expected {round!r}")
    if not isinstance(info.get("bytes"), int) or info["bytes"] < 0 or not isinstance(info.get("sha256"), str):
        raise PayloadError(f"{INFO_FILE} lacks the payload's byte count or sha256")
    return info


def check_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    """``metrics`` as a str -> float dict; NaN/Inf raise (JSON and the card need finite numbers)."""
    checked = {str(k): float(v) for k, v in (metrics or {}).items()}
    bad = [k for k, v in checked.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"metrics must be finite numbers, got NaN/Inf for {bad}")
    return checked


def check_history(history: object) -> list[dict]:
    """A ``peer.json`` history: a list of {round, bytes, params_transmitted, neighbours}; raise PayloadError if not."""
    if not isinstance(history, list):
        raise PayloadError(f"{INFO_FILE} history is a {type(history).__name__}, expected a list")
    for entry in history:
        ok = isinstance(entry, dict) and all(
            isinstance(entry.get(k), int) and entry[k] >= 0 for k in ("round", "bytes", "params_transmitted")
        )
        neighbours = entry.get("neighbours") if isinstance(entry, dict) else None
        if not ok or not (
            neighbours is None or (isinstance(neighbours, list) and all(isinstance(n, str) for n in neighbours))
        ):
            raise PayloadError(f"{INFO_FILE} history entry {entry!r} is malformed")
    return history
