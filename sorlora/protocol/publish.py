"""What a peer publishes at the end (device side), one :class:`Publisher` per final model in :data:`PUBLISHERS`.

Every peer commits its ``final`` revision (:data:`~sorlora_gossip.layout.FINAL_TAG`): its final own part, its report
and its PEFT adapter (with the adapter card, for SO-LoRA). A final model may add files to that revision
(``neighbourhood``: the neighbours' parts its last average kept) or publish a repo of its own (``moe``: the peer's
implicit mixture of experts of all clusters, ``<peer>-moe``). How an evaluator scores each final model is
:mod:`sorlora.evaluation.final_models`.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from model_cards import ExpertInfo, MoECardInfo
from moe_router.configuration import EXPERTS_FILE
from peft_sorlora import PayloadError
from sorlora_gossip.cards import publish_adapter
from sorlora_gossip.hub.base import RevisionNotFound
from sorlora_gossip.layout import EXPERT_FILE, FINAL_TAG, NEIGHBOURHOOD_DIR, REPORT_FILE, moe_repo_name

from ..runtime.moe import build_moe
from .terms import TermsError

__all__ = ["PUBLISHERS", "Publisher", "experts_for_moe", "publish_final"]


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


def experts_for_moe(program: Any) -> tuple[list[list[Any]], dict[tuple[int, int], dict[str, torch.Tensor]]]:
    """All clusters' experts (own cluster from the program's view, the others from its last exchange) and each
    member's task statistics from the collaboration repo, in plan order: what the implicit MoE is built from."""
    if not program.experts:
        program.load_experts(program.terms.rounds - 1)
    experts, calibration = [], {}
    plan = program.plan
    commit = plan["collab_commit"]
    for c, members in enumerate(plan["clusters"]):
        if program.peer_id in members:
            parts = {program.index_of(m): program.view[program.name_of(program.index_of(m))] for m in members
                     if program.name_of(program.index_of(m)) in program.view}  # fmt: skip
        else:
            parts = program.experts.get(c, {})
        if not parts:
            continue
        e = len(experts)
        experts.append([parts[q] for q in sorted(parts)])
        for m, q in enumerate(sorted(parts)):
            try:
                calibration[(e, m)] = program.collab.member_stats(plan["members"][q], revision=commit)
            except (TermsError, PayloadError) as exc:
                raise TermsError(f"peer {program.peer_id}: task statistics of {plan['members'][q]}: {exc}") from exc
    return experts, calibration


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
