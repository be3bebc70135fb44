"""gossip: decentralized exchange of SO-LoRA updates between peers through Hub repos.

Hub layer (:mod:`sorlora_gossip.hub`): one interface, a local folder backend and a Hugging Face Hub backend.
Peer layer (:mod:`sorlora_gossip.peer`): one revision per peer per round, pinned pulls of the neighbours' revisions.
Who talks to whom (:mod:`sorlora_gossip.wireless`, :mod:`sorlora_gossip.topology`) and how received updates combine
(:mod:`sorlora_gossip.aggregation`), what it costs (:mod:`sorlora_gossip.accounting`), and a picture (:mod:`sorlora_gossip.plot`):
plain functions over networkx graphs and tensors, usable without any model.
"""

from .accounting import (
    CommStats,
    LinkStats,
    dense_payload_stats,
    lora_round_stats,
    round_stats,
    solora_round_stats,
    total_stats,
)
from .aggregation import cluster_experts, fedavg, masked_average, masked_average_updates, member_views, restrict_to_mask
from .cards import AdapterCards, publish_adapter
from .dense import DenseUpdate
from .hub import (
    EntryNotFound,
    HfHub,
    Hub,
    HubError,
    HubForbidden,
    HubServer,
    HubUnavailable,
    LocalHub,
    PushConflictError,
    RepoNotFound,
    RevisionNotFound,
    open_hub,
)
from .payload import Payload
from .peer import Peer, PushResult, Rejection, RoundHook, RoundPull, round_tag
from .plot import plot_topology
from .topology import (
    cluster_collision_rate,
    cluster_topology,
    clusters,
    fully_connected,
    neighbours,
    random_topology,
    ring,
    single_cluster,
)
from .untrusted import read_json
from .wireless import (
    ChannelParams,
    channel_gains,
    is_feasible,
    link_delay,
    link_rate,
    min_power,
    peer_power,
    place_peers,
)

__all__ = [
    # hub
    "EntryNotFound",
    "HfHub",
    "Hub",
    "HubError",
    "HubServer",
    "HubForbidden",
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
    "read_json",
    "Payload",
    "DenseUpdate",
    "AdapterCards",
    "RoundHook",
    "publish_adapter",
    # topology and channel
    "ChannelParams",
    "place_peers",
    "channel_gains",
    "link_rate",
    "link_delay",
    "min_power",
    "peer_power",
    "is_feasible",
    "cluster_topology",
    "cluster_collision_rate",
    "random_topology",
    "single_cluster",
    "ring",
    "fully_connected",
    "clusters",
    "neighbours",
    # aggregation
    "masked_average",
    "fedavg",
    "restrict_to_mask",
    "masked_average_updates",
    "member_views",
    "cluster_experts",
    # accounting and plots
    "CommStats",
    "LinkStats",
    "dense_payload_stats",
    "round_stats",
    "solora_round_stats",
    "lora_round_stats",
    "total_stats",
    "plot_topology",
]
