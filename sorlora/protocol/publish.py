"""What a peer publishes at the end (device side), one :class:`Publisher` per final model in :data:`PUBLISHERS`.

Every peer commits its ``final`` revision (:data:`~sorlora_gossip.layout.FINAL_TAG`): its final own part, its report
and its PEFT adapter (with the adapter card, for SO-LoRA). A final model may add files to that revision
(``neighbourhood``: the neighbours' parts its last average kept) or publish a repo of its own (``moe``: the peer's
implicit mixture of experts of all clusters, ``<peer>-moe``). How an evaluator scores each final model is
:mod:`sorlora.evaluation.final_models`.

The MoE's ``sequence`` router needs every cluster's centroids: each member of an MoE method registers, beside its
task statistics, up to :data:`~moe_router.centroids.MAX_CENTROIDS` centroids of its training prompts' mean-pooled
hidden states on the bare base (``members/<user>/<peer>.centroids.safetensors``, :func:`centroid_bytes`, committed with its registration; with
``centroid_epsilon`` in the terms, Gaussian noise is added first). A publishing peer reads them back at the plan's
pinned commit with :func:`read_centroids` (size cap, 2-D shape, at most ``MAX_CENTROIDS`` rows, the pooled layer's
width, finite values, the same pooling layer): an invalid or missing file only leaves that member's centroids out.
"""

from __future__ import annotations

import json
import logging
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from model_cards import ExpertInfo, MoECardInfo
from moe_router.centroids import MAX_CENTROIDS
from moe_router.configuration import EXPERTS_FILE
from peft_sorlora import PayloadError
from sorlora_gossip.cards import publish_adapter
from sorlora_gossip.hub.base import EntryNotFound, RevisionNotFound
from sorlora_gossip.layout import (
    EXPERT_FILE,
    FINAL_TAG,
    NEIGHBOURHOOD_DIR,
    REPORT_FILE,
    member_path,
    moe_repo_name,
)

from ..runtime.moe import build_moe
from .collab import read_capped
from .terms import TermsError

__all__ = [
    "CENTROIDS_FORMAT",
    "MAX_CENTROID_BYTES",
    "PUBLISHERS",
    "Publisher",
    "centroid_bytes",
    "centroids_path",
    "experts_for_moe",
    "moe_centroids",
    "publish_final",
    "read_centroids",
]

logger = logging.getLogger(__name__)

CENTROIDS_FORMAT = "sorlora-centroids/1"
MAX_CENTROID_BYTES = 1 << 20  # MAX_CENTROIDS x d float32 plus header: 1 MiB allows d up to 65k


class Publisher:
    """What one kind of final model publishes beyond the peer's own final adapter and report (default: nothing)."""

    def final_files(self, program: Any) -> dict[str, bytes]:
        """Files the peer's ``final`` revision carries besides its own adapter and report."""
        return {}

    def publish(self, program: Any) -> None:
        """Publish what this final model needs beyond the peer's final revision."""


class NeighbourhoodParts(Publisher):
    """LoRI: the peer's final view is its own adapter plus its neighbours' parts of its last average."""

    def final_files(self, program: Any) -> dict[str, bytes]:
        me = program.name_of(program.index)
        return {f"{NEIGHBOURHOOD_DIR}/{name}.safetensors": part.to_bytes() for name, part in program.view.items()
                if name != me}  # fmt: skip


class ImplicitMoE(Publisher):
    """Each peer builds its own implicit MoE of all clusters' experts and publishes it (``<peer>-moe``)."""

    def publish(self, program: Any) -> None:
        hub, terms = program.hub, program.terms
        repo_id = hub.repo_id(f"{program.user}/{moe_repo_name(program.name)}")
        if hub.repo_exists(repo_id) and EXPERTS_FILE in hub.list_files(repo_id):
            return
        experts, calibration = experts_for_moe(program)
        moe = build_moe(program.ws, experts, calibration=calibration, router_top_k=terms.router_top_k,
                        refine=terms.router_refine)  # fmt: skip
        configure_router(moe, program, terms.router)
        clusters = [c for c in program.plan["clusters"]]
        card = MoECardInfo(
            repo_id=repo_id,
            base_model=terms.base_model,
            experts=[
                ExpertInfo(cluster=c, peers=list(m), tasks=[program.state["tasks"][p] for p in m])
                for c, m in enumerate(clusters)
            ],  # fmt: skip
            router_top_k=moe.config.router_top_k,
            refinement=moe.config.refine,
            results={},
            method=terms.method,
            base_in_repo=terms.publish_base,
        )
        with tempfile.TemporaryDirectory() as tmp:
            moe.save_pretrained(tmp, save_base=terms.publish_base, card_info=card)
            files = {str(f.relative_to(tmp)): f.read_bytes() for f in sorted(Path(tmp).rglob("*")) if f.is_file()}
        hub.create_repo(repo_id, exist_ok=True)
        hub.create_commit(repo_id, files, commit_message=f"{program.peer_id}: implicit MoE of all clusters' experts")


PUBLISHERS: dict[str, Publisher] = {
    "per-peer": Publisher(),
    "neighbourhood": NeighbourhoodParts(),
    "cluster": Publisher(),
    "oracle": Publisher(),
    "moe": ImplicitMoE(),
}


def _moe_clusters(program: Any, *, with_parts: bool = False) -> list[tuple[Any, list[int]]]:
    """The MoE's experts in plan order: per cluster with any part, (its parts by member index, or its plan index
    without ``with_parts``; the sorted member indices)."""
    if not program.experts:
        program.load_experts(program.terms.rounds - 1)
    out = []
    for c, members in enumerate(program.plan["clusters"]):
        if program.peer_id in members:
            parts = {program.index_of(m): program.view[program.name_of(program.index_of(m))] for m in members
                     if program.name_of(program.index_of(m)) in program.view}  # fmt: skip
        else:
            parts = program.experts.get(c, {})
        if parts:
            out.append((parts if with_parts else c, sorted(parts)))
    return out


def experts_for_moe(program: Any) -> tuple[list[list[Any]], dict[tuple[int, int], dict[str, torch.Tensor]]]:
    """All clusters' experts (own cluster from the program's view, the others from its last exchange) and each
    member's task statistics from the collaboration repo, in plan order: what the implicit MoE is built from."""
    experts, calibration = [], {}
    plan = program.plan
    commit = plan["collab_commit"]
    for e, (parts, members) in enumerate(_moe_clusters(program, with_parts=True)):
        experts.append([parts[q] for q in members])
        for m, q in enumerate(members):
            try:
                calibration[(e, m)] = program.collab.member_stats(plan["members"][q], revision=commit)
            except (TermsError, PayloadError) as exc:
                raise TermsError(f"peer {program.peer_id}: task statistics of {plan['members'][q]}: {exc}") from exc
    return experts, calibration


def configure_router(moe: Any, program: Any, router: str) -> None:
    """Give ``moe`` every cluster's centroids (when any member registered valid ones) and make ``router`` its
    router; a ``sequence`` router without any valid centroid falls back to ``implicit`` (logged)."""
    pool = moe.router.layer_keys[0]
    centroids = moe_centroids(program, pool_layer=pool, width=moe.router.layer_widths[pool])
    if any(c is not None for c in centroids):
        moe.set_centroids(centroids, pool_layer=pool)
    elif router == "sequence":
        logger.warning("peer %s: no valid centroids from any member: the MoE is published with the implicit router",
                       program.peer_id)  # fmt: skip
        router = "implicit"
    moe.set_router(router=router)


def centroids_path(user: str, peer: str) -> str:
    """Where a member registers its sequence-router centroids in the collaboration repo."""
    return member_path(user, peer).removesuffix(".json") + ".centroids.safetensors"


def centroid_bytes(centroids: torch.Tensor, pool_layer: str) -> bytes:
    """The centroids file: ``centroids`` (k x d float32) with the pooled layer's key in the metadata."""
    return save_safetensors({"centroids": centroids.detach().float().cpu().contiguous()},
                            metadata={"format": CENTROIDS_FORMAT, "pool_layer": pool_layer})  # fmt: skip


def _metadata(data: bytes) -> dict[str, str]:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    return dict(header.get("__metadata__") or {})


def read_centroids(hub: Any, repo_id: str, peer: str, *, revision: str, pool_layer: str, width: int) -> torch.Tensor:
    """A member's centroids (k x ``width``) at ``revision``, validated; ``TermsError`` saying why otherwise."""
    user, name = peer.split("/", 1)
    path = centroids_path(user, name)
    where = f"{repo_id}/{path}@{revision[:12]}"
    try:
        data = read_capped(hub, repo_id, path, revision, MAX_CENTROID_BYTES)
    except EntryNotFound as exc:
        raise TermsError(f"{where}: no centroids registered") from exc
    try:
        tensors, meta = load_safetensors(data), _metadata(data)
    except Exception as exc:  # noqa: BLE001 - any parse failure of untrusted bytes is a refusal
        raise TermsError(f"{where}: not a safetensors file: {exc}") from exc
    if set(tensors) != {"centroids"} or meta.get("format") != CENTROIDS_FORMAT:
        raise TermsError(f"{where}: not a {CENTROIDS_FORMAT} file (tensors {sorted(tensors)[:3]})")
    if meta.get("pool_layer") != pool_layer:
        raise TermsError(f"{where}: pooled at {meta.get('pool_layer')!r}, the MoE pools {pool_layer!r}")
    c = tensors["centroids"]
    if c.dtype != torch.float32 or c.ndim != 2 or not 1 <= c.shape[0] <= MAX_CENTROIDS or c.shape[1] != width:
        raise TermsError(f"{where}: centroids must be float32 (1..{MAX_CENTROIDS}) x {width}, got {c.dtype} "
                         f"{tuple(c.shape)}")  # fmt: skip
    if not torch.isfinite(c).all() or bool((c.norm(dim=-1) == 0).any()):
        raise TermsError(f"{where}: centroids must be finite and non-zero")
    return c


def moe_centroids(program: Any, *, pool_layer: str, width: int) -> list[torch.Tensor | None]:
    """Per expert of :func:`experts_for_moe` (same order), its members' valid centroids concatenated (None when no
    member of it has valid ones); a member whose file is missing or invalid is left out, with a warning."""
    plan, out = program.plan, []
    for _, members in _moe_clusters(program):
        sets = []
        for q in members:
            peer = plan["members"][q]
            try:
                sets.append(read_centroids(program.hub, program.collab.repo_id, peer, revision=plan["collab_commit"],
                                           pool_layer=pool_layer, width=width))  # fmt: skip
            except TermsError as exc:
                logger.warning("peer %s: the centroids of %s are left out: %s", program.peer_id, peer, exc)
        out.append(torch.cat(sets) if sets else None)
    return out


def publish_final(program: Any, *, crash_point: Callable[[str], None] = lambda tag: None) -> None:
    """Commit the program's ``final`` revision (once), then what its final model publishes besides."""
    repo = program.hub.repo_id(program.peer_id)
    me = program.name_of(program.index)
    publisher = PUBLISHERS[program.spec.final]
    try:
        program.hub.resolve(repo, FINAL_TAG)
    except RevisionNotFound:
        report = {"peer": program.peer_id, "task": program.data.task, "records": program.state["records"],
                  "exchanges": program.state["exchanges"], "plan_sha256": program.plan["plan_sha256"]}  # fmt: skip
        files = {EXPERT_FILE: program.view[me].to_bytes(), REPORT_FILE: json.dumps(report, indent=1).encode()}
        files.update(publisher.final_files(program))  # what its final model needs besides
        program.ws.load_view({me: program.view[me]})
        if program.kind.sparse:
            with tempfile.TemporaryDirectory() as tmp:
                program.ws.model.save_pretrained(tmp, selected_adapters=[me])
                folder = Path(tmp) / me if (Path(tmp) / me).is_dir() else Path(tmp)
                files.update({f.name: f.read_bytes() for f in folder.iterdir()
                              if f.suffix in (".json", ".safetensors")})  # fmt: skip
            publish_adapter(program.peer, files, tag=FINAL_TAG)
        else:  # the dense baseline's repo carries no SO-LoRA card: a plain commit, tagged
            sha = program.hub.create_commit(repo, files, commit_message=f"{program.peer_id}: final adapter")
            program.hub.create_tag(repo, FINAL_TAG, revision=sha, exist_ok=True)
    crash_point(f"{program.peer_id}:published:{program.terms.rounds - 1}")
    publisher.publish(program)
