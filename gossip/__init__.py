"""gossip: decentralized exchange of SO-LoRA updates between peers through Hub repos.

Hub layer (:mod:`gossip.hub`): one interface, a local folder backend and a Hugging Face Hub backend.
Peer layer (:mod:`gossip.peer`): one revision per peer per round, pinned pulls of the neighbours' revisions.
"""

from .hub import (
    EntryNotFound,
    HfHub,
    Hub,
    HubError,
    HubServer,
    HubUnavailable,
    LocalHub,
    PushConflictError,
    RepoNotFound,
    RevisionNotFound,
    open_hub,
)
from .peer import Peer, PushResult, Rejection, RoundPull, round_tag

__all__ = [
    # hub
    "EntryNotFound",
    "HfHub",
    "Hub",
    "HubError",
    "HubServer",
    "HubUnavailable",
    "LocalHub",
    "PushConflictError",
    "RepoNotFound",
    "RevisionNotFound",
    "open_hub",
    # peer
    "Peer",
    "PushResult",
    "Rejection",
    "RoundPull",
    "round_tag",
]
