"""The on-hub layout of a collaboration: which repo holds which file, and who may write it.

Two kinds of repo take part (``../shared/docs/protocol.md``):

- a **peer repo** ``USER/PEER`` in its owner's namespace: one commit per round holding :data:`UPDATE_FILE`,
  :data:`INFO_FILE` and the card :data:`CARD_FILE`, tagged :func:`round_tag`; only its owner writes it;
- a **collaboration repo** ``NS/NAME``: :data:`COLLAB_FILE` (the pinned terms, written once by its creator),
  one registration per member at :func:`member_path` (each written only by that member's user) and
  :data:`PLAN_FILE` (written once, by the first member to commit it; every other member recomputes and checks it).

A peer is identified by its full repo id; a registration names it. ``hub-serve`` enforces the write rules above
(:func:`collab_write_allowed`), as the real Hub's namespace permissions do for peer repos.
"""

from __future__ import annotations

import re

__all__ = [
    "ADMITTED_KEY",
    "CARD_FILE",
    "COLLAB_FILE",
    "INFO_FILE",
    "INFO_FORMAT",
    "MEMBERS_DIR",
    "PLAN_FILE",
    "ROUND_TAG_RE",
    "UPDATE_FILE",
    "collab_write_allowed",
    "member_path",
    "round_tag",
]

UPDATE_FILE = "update.safetensors"
INFO_FILE = "peer.json"
INFO_FORMAT = "sorlora-peer/1"
CARD_FILE = "README.md"

COLLAB_FILE = "collab.json"
PLAN_FILE = "plan.json"
MEMBERS_DIR = "members"
ADMITTED_KEY = "admitted"  # in collab.json: null (any authenticated user) or a list of user names

ROUND_TAG_RE = re.compile(r"round-\d{4,}")


def round_tag(round: int) -> str:
    """The tag naming a peer's revision for ``round`` (``round-0007``)."""
    if not isinstance(round, int) or isinstance(round, bool) or round < 0:
        raise ValueError(f"round must be a non-negative integer, got {round!r}")
    return f"round-{round:04d}"


def member_path(user: str, peer: str) -> str:
    """Where user ``user`` registers its peer ``peer`` in a collaboration repo: ``members/<user>/<peer>.json``."""
    return f"{MEMBERS_DIR}/{user}/{peer}.json"


def collab_write_allowed(user: str, paths: list[str], *, plan_exists: bool) -> bool:
    """Whether ``user`` (admitted to the collaboration) may commit ``paths`` to a collaboration repo it does not own:
    only its own registrations, and the plan while there is none yet."""
    own = f"{MEMBERS_DIR}/{user}/"
    return bool(paths) and all(p.startswith(own) or (p == PLAN_FILE and not plan_exists) for p in paths)
