"""What a peer publishes at the end (device side), one :class:`Publisher` per final model in :data:`PUBLISHERS`.

Every peer commits its ``final`` revision (:data:`~sorlora_gossip.layout.FINAL_TAG`): its final own part, its report
and its PEFT adapter (with the adapter card and the base's tokenizer files, for SO-LoRA), so that
``AutoPeftModelForCausalLM.from_pretrained("<user>/<peer>", revision="final")`` and ``AutoTokenizer`` load it. A
final model may add files to that revision (``neighbourhood``: the neighbours' parts its last average kept) or
publish a repo (``moe``). How an evaluator scores each final model is :mod:`sorlora.evaluation.final_models`.

**Loading anywhere.** The adapter's ``adapter_config.json`` and the MoE's ``config.json`` name the base by the terms'
``base_repo`` when the collaboration hosts its base on its own hub (``sorlora collab create --host-base``: a plain
transformers repo ``<ns>/<collab>-base``), so that both load with only ``HF_ENDPOINT`` (+ token) set; otherwise by
the pinned ``base_model`` id, with the weights fingerprint in the MoE's config and both cards (a user passes a local
copy; :mod:`moe_router` falls back to the bundled copy when the fingerprint matches, or says in one line what to
pass).

**One MoE per collaboration.** Every member of the MoE method builds the same implicit MoE: every cluster's expert is
the masked robust average (:func:`~sorlora.methods.rules.cluster_expert`) of its members' last-round revisions, the
own cluster's too, and the router's task statistics and centroids are read at the plan's pinned commit. So the
first member to claim it publishes it and the others verify and use it:

1. a member builds the MoE's files and their content hash (:func:`moe_digest`: every file but the card, JSON
   without ``transformers_version``) and commits its claim ``members/<user>/<peer>.moe-claim`` (:func:`claim_bytes`:
   the repo ``<user>/<collab>-moe`` in its own namespace and the hash) to the collaboration repo;
2. it reads the claims in the order the collaboration's linear history added them (the commit that last changed
   each file; by path inside one commit). A claim is skipped, with the reason logged and recorded in the member's
   ``report.json``, when it is malformed, names a repo outside its user's namespace or another name, was written by
   another user (the hub's commit ``authors``), is not a member's of the plan, claims another hash than this member
   would build, or when its repo holds other files or bytes than this member would publish, or is not published
   within ``round_timeout_s`` of this member's first look;
3. the first claim not skipped is THE MoE; when it is the member's own, the member publishes the repo (once: a
   restart finds it there). Its ``report.json`` (key ``moe``) and card name the repo.

A member that would build another MoE (after a skipped neighbour, say) thus publishes its own, recorded, and every
member whose build agrees names the first one. Claiming before publishing means two members never both publish
while they agree.

The MoE's ``sequence`` router needs every cluster's centroids: each member of an MoE method registers, beside its
task statistics, up to :data:`~moe_router.centroids.MAX_CENTROIDS` centroids of its training prompts' mean-pooled
hidden states on the bare base (``members/<user>/<peer>.centroids.safetensors``, :func:`centroid_bytes`, committed with its registration; with
``centroid_epsilon`` in the terms, Gaussian noise is added first). A publishing peer reads them back at the plan's
pinned commit with :func:`read_centroids` (size cap, 2-D shape, at most ``MAX_CENTROIDS`` rows, the pooled layer's
width, finite values, the same pooling layer): an invalid or missing file only leaves that member's centroids out.
The same file holds the mean of those pooled vectors and their number (:func:`read_prompt_mean`): the task signature
the automatic cluster topology compares members by (:func:`sorlora_gossip.topology.signature_distances`).

A ``final`` commit is made once: a peer restarted between the commit and its tag finds its own earlier ``final``
commit on ``main`` (by its message, holding a report) and tags it instead of committing again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from model_cards import ExpertInfo, MoECardInfo
from moe_router.centroids import MAX_CENTROIDS
from moe_router.configuration import EXPERTS_FILE
from peft_sorlora import PayloadError
from peft_sorlora.base_model import base_fingerprint
from peft_sorlora.exchange import read_payload_metadata
from sorlora_gossip.cards import publish_adapter
from sorlora_gossip.hub.base import EntryNotFound, HubError, RepoNotFound, RevisionNotFound
from sorlora_gossip.layout import (
    ADAPTER_CONFIG_FILE,
    CARD_FILE,
    EXPERT_FILE,
    FINAL_TAG,
    MEMBERS_DIR,
    MOE_CLAIM_SUFFIX,
    NEIGHBOURHOOD_DIR,
    REPORT_FILE,
    base_repo_name,
    member_file,
    moe_claim_path,
    moe_repo_name,
)
from sorlora_gossip.untrusted import read_json

from ..methods.rules import cluster_expert
from ..runtime.model_loading import load_base
from ..runtime.moe import build_moe
from .collab import files_by_last_change, read_capped
from .terms import TermsError

__all__ = [
    "CENTROIDS_FORMAT",
    "MAX_CENTROID_BYTES",
    "MOE_CLAIM_FORMAT",
    "PUBLISHERS",
    "MoEClaim",
    "Publisher",
    "centroid_bytes",
    "centroids_path",
    "claim_bytes",
    "experts_for_moe",
    "host_base",
    "moe_centroids",
    "moe_claims",
    "moe_digest",
    "publish_final",
    "read_centroids",
    "read_prompt_mean",
    "tokenizer_files",
]

logger = logging.getLogger(__name__)

CENTROIDS_FORMAT = "sorlora-centroids/1"
MAX_CENTROID_BYTES = 1 << 20  # MAX_CENTROIDS x d float32 plus header: 1 MiB allows d up to 65k
MAX_SUMMARY_PROMPTS = 1 << 20  # prompts a registered mean may claim to average (a count, not a weight)
MOE_CLAIM_FORMAT = "sorlora-moe-claim/1"
MAX_CLAIM_BYTES = 4096
_SHA256 = re.compile(r"[0-9a-f]{64}")
HOSTED_SHARD_BYTES = 128 << 20  # a hosted base's weight shards and commits (hub-serve takes 512 MiB bodies)
_FINAL_MESSAGES = ("{peer}: adapter (final)", "{peer}: final adapter")  # publish_adapter's, the dense baseline's


class Publisher:
    """What one kind of final model publishes beyond the peer's own final adapter and report (default: nothing)."""

    def final_files(self, program: Any) -> dict[str, bytes]:
        """Files the peer's ``final`` revision carries besides its own adapter and report."""
        return {}

    def publish(self, program: Any) -> dict[str, Any] | None:
        """Publish what this final model needs beyond the peer's final revision, before it (so that the report can
        name it): what ``report.json`` records about it ({} for nothing), or None while it waits for others (the
        program steps again later)."""
        return {}


class NeighbourhoodParts(Publisher):
    """LoRI: the peer's final view is its own adapter plus its neighbours' parts of its last average."""

    def final_files(self, program: Any) -> dict[str, bytes]:
        me = program.name_of(program.index)
        return {f"{NEIGHBOURHOOD_DIR}/{name}.safetensors": part.to_bytes() for name, part in program.view.items()
                if name != me}  # fmt: skip


def host_base(hub: Any, collab_id: str, base_model: str, fingerprint: str, *, model: str | None = None) -> str:
    """Host the collaboration's pinned base once on its own hub, as a plain transformers repo (weights, config,
    tokenizer) ``<ns>/<collab>-base`` in the collaboration's namespace, so that what its members publish loads from
    that one endpoint; returns the repo id (the ``base_repo`` term). The weights (``model``: a local copy or Hub id,
    else ``base_model`` itself) must have the pinned ``fingerprint``; pushing the same files again makes no commit."""
    namespace, name = collab_id.split("/", 1)
    repo = f"{namespace}/{base_repo_name(name)}"
    net, tokenizer, _ = load_base(base_model, model=model)
    found = base_fingerprint(net)
    if found != fingerprint:
        raise TermsError(f"the base to host (fingerprint {found}) is not the pinned {base_model} ({fingerprint})")
    with tempfile.TemporaryDirectory() as tmp:
        net.save_pretrained(tmp, max_shard_size=f"{HOSTED_SHARD_BYTES // (1 << 20)}MB")
        tokenizer.save_pretrained(tmp)
        files = sorted(f for f in Path(tmp).rglob("*") if f.is_file())
        hub.create_repo(repo, exist_ok=True)
        batches: list[list[Path]] = [[]]  # commits of at most about HOSTED_SHARD_BYTES: under hub-serve's limit
        size = 0  # of the last batch
        for f in files:
            if batches[-1] and size + f.stat().st_size > HOSTED_SHARD_BYTES:
                batches.append([])
                size = 0
            batches[-1].append(f)
            size += f.stat().st_size
        for batch in batches:
            message = f"{base_model} (fingerprint {fingerprint}), hosted for {collab_id}"
            hub.create_commit(repo, {str(b.relative_to(tmp)): b for b in batch}, commit_message=message)
    return repo


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The files ``tokenizer.save_pretrained`` writes (what ``AutoTokenizer.from_pretrained`` reads from a repo)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {f.name: f.read_bytes() for f in sorted(Path(tmp).iterdir()) if f.is_file()}


def moe_digest(files: dict[str, bytes]) -> str:
    """The content hash of an MoE repo's files: every file but the card, by path; a JSON file canonical and without
    ``transformers_version`` (members with another transformers release build the same model)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        if name == CARD_FILE:
            continue
        data = files[name]
        if name.endswith(".json"):
            try:
                value = json.loads(data)
            except (UnicodeDecodeError, json.JSONDecodeError):
                value = None
            if isinstance(value, dict):
                value.pop("transformers_version", None)
                data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
        digest.update(f"{name}\n{len(data)}\n".encode())
        digest.update(data)
    return digest.hexdigest()


@dataclass(frozen=True)
class MoEClaim:
    """A member's claim of the collaboration's MoE: where (``path``), by whom, which repo and content hash, the
    commit that last changed it; ``problem`` says why it does not count (empty when it may)."""

    path: str
    peer: str
    repo: str
    sha256: str
    commit: str
    problem: str = ""


def claim_bytes(peer: str, repo: str, sha256: str) -> bytes:
    """The claim file of member ``peer``: the MoE repo it publishes or uses and the content hash it would build."""
    return json.dumps({"format": MOE_CLAIM_FORMAT, "peer": peer, "repo": repo, "sha256": sha256}, indent=1).encode()


def _parse_claim(hub: Any, collab: str, path: str, commit: Any, members: list[str], moe_name: str) -> MoEClaim:
    user, _, rest = path.removeprefix(f"{MEMBERS_DIR}/").partition("/")
    peer = f"{user}/{rest.removesuffix(MOE_CLAIM_SUFFIX)}"
    claim = MoEClaim(path=path, peer=peer, repo="", sha256="", commit=commit.sha)
    try:
        data = read_json(hub, collab, path, revision=commit.sha, max_bytes=MAX_CLAIM_BYTES)
    except (PayloadError, HubError) as exc:  # over the cap, not JSON, gone
        return dataclasses.replace(claim, problem=f"unreadable: {str(exc)[:200]}")
    if not isinstance(data, dict) or data.get("format") != MOE_CLAIM_FORMAT:
        return dataclasses.replace(claim, problem=f"not a {MOE_CLAIM_FORMAT} claim")
    repo, sha = data.get("repo"), data.get("sha256")
    claim = dataclasses.replace(claim, repo=repo if isinstance(repo, str) else "",
                                sha256=sha if isinstance(sha, str) else "")  # fmt: skip
    if data.get("peer") != peer or moe_claim_path(*peer.split("/", 1)) != path:
        problem = f"names peer {str(data.get('peer'))[:80]!r}, not the member of its path"
    elif repo != f"{user}/{moe_name}":
        problem = f"names repo {str(repo)[:80]!r}, not {user}/{moe_name} (its user's own namespace)"
    elif not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        problem = "has no sha256 of 64 hex digits"
    elif peer not in members:
        problem = f"{peer} is not a member of the plan"
    elif commit.authors and user not in commit.authors:
        problem = f"last written by {', '.join(commit.authors)}, not by its user {user}"
    else:
        problem = ""
    return dataclasses.replace(claim, problem=problem)


def moe_claims(hub: Any, collab: str, *, members: list[str], ids: dict[str, dict[str, str]] | None = None
               ) -> list[MoEClaim]:  # fmt: skip
    """The MoE claims in the collaboration repo, in the order its linear history added them (the commit that last
    changed each file; by path inside one commit), each validated (:attr:`MoEClaim.problem`). ``ids``: a cache of
    the claim files' blob ids per commit (commits never change), kept by the caller between looks."""
    ids_of = {} if ids is None else ids
    moe_name = moe_repo_name(collab.split("/", 1)[1])
    history = list(reversed(hub.list_commits(collab)))  # oldest first

    def claim_ids(sha: str) -> dict[str, str]:
        if sha not in ids_of:
            ids_of[sha] = {p: oid for p, oid in hub.file_ids(collab, revision=sha).items()
                           if p.startswith(f"{MEMBERS_DIR}/") and p.count("/") == 2 and p.endswith(MOE_CLAIM_SUFFIX)}  # fmt: skip
        return ids_of[sha]

    last = deque(files_by_last_change(history, claim_ids), maxlen=1)  # the files at the head
    files = last[0][1] if last else []
    return [_parse_claim(hub, collab, path, commit, members, moe_name) for path, commit in files]


def _repo_state(hub: Any, repo: str, files: dict[str, bytes], digest: str) -> str:
    """``ok`` when ``repo`` holds exactly the MoE of ``files`` (by :func:`moe_digest`), ``pending`` when it does
    not hold a whole MoE yet, else why not. Every file read is capped at the size of this member's own."""
    try:
        listed = set(hub.list_files(repo))
    except (RepoNotFound, RevisionNotFound):
        return "pending"
    if EXPERTS_FILE not in listed or "config.json" not in listed:
        return "pending"
    want = {n for n in files if n != CARD_FILE}
    have = {n for n in listed if n != CARD_FILE}
    if have != want:
        return f"{repo} holds other files ({sorted(have ^ want)[:4]}) than this member would publish"
    got = {}
    for name in sorted(want):
        cap = len(files[name]) if not name.endswith(".json") else 2 * len(files[name]) + 4096
        try:
            got[name] = hub.read_bytes(repo, name, revision="main", max_bytes=cap)
        except HubError as exc:  # over the cap (RequestTooLarge), missing, refused
            return f"{repo}/{name}: {str(exc)[:200]}"
    found = moe_digest(got)
    return "ok" if found == digest else f"{repo} holds MoE {found[:12]}, not the {digest[:12]} this member builds"


def _moe_files(program: Any, repo_id: str) -> dict[str, bytes]:
    """The files of the MoE this member builds (config, experts, remote code, tokenizer, card naming ``repo_id``;
    the base under ``base/`` with the ``publish_base`` term)."""
    terms = program.terms
    experts, calibration = experts_for_moe(program)
    moe = build_moe(program.ws, experts, calibration=calibration, router_top_k=terms.router_top_k,
                    refine=terms.router_refine)  # fmt: skip
    configure_router(moe, program, terms.router)
    moe.config.base_model_name_or_path = terms.base_repo or terms.base_model
    moe.config.base_fingerprint = terms.base_fingerprint
    clusters = [program.plan["clusters"][c] for c, _ in _moe_clusters(program)]
    card = MoECardInfo(
        repo_id=repo_id,
        base_model=terms.base_repo or terms.base_model,
        experts=[
            ExpertInfo(cluster=c, peers=list(m), tasks=[program.state["tasks"][p] for p in m])
            for c, m in enumerate(clusters)
        ],  # fmt: skip
        router_top_k=moe.config.router_top_k,
        refinement=moe.config.refine,
        results={},
        method=terms.method,
        base_in_repo=terms.publish_base,
        base_fingerprint=terms.base_fingerprint,
        pinned_base=terms.base_model,
        tokenizer_in_repo=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        moe.save_pretrained(tmp, save_base=terms.publish_base, card_info=card)
        files = {str(f.relative_to(tmp)): f.read_bytes() for f in sorted(Path(tmp).rglob("*")) if f.is_file()}
    files.update(tokenizer_files(program.tokenizer))
    return files


class ImplicitMoE(Publisher):
    """The collaboration's one implicit MoE of all clusters' experts: claimed, published once, verified and named by
    every member (see the module docstring)."""

    def publish(self, program: Any) -> dict[str, Any] | None:
        hub, collab = program.hub, program.collab.repo_id
        own_repo = hub.repo_id(f"{program.user}/{moe_repo_name(collab.split('/', 1)[1])}")
        built = getattr(program, "_moe_built", None)
        if built is None:
            if not own_cluster_expert(program):
                return None
            files = _moe_files(program, own_repo)
            built = program._moe_built = (files, moe_digest(files))
        files, digest = built
        members = list(program.plan["members"])
        mine = moe_claim_path(program.user, program.name)
        cache = program.__dict__.setdefault("_moe_claim_ids", {})
        claims = moe_claims(hub, collab, members=members, ids=cache)
        own = next((c for c in claims if c.path == mine), None)
        if own is None or own.sha256 != digest or own.repo != own_repo:
            hub.create_commit(collab, {mine: claim_bytes(program.peer_id, own_repo, digest)},
                              commit_message=f"{program.peer_id}: claims the MoE {own_repo} ({digest[:12]})")  # fmt: skip
            claims = moe_claims(hub, collab, members=members, ids=cache)
        first_look = getattr(program, "_moe_first_look", None) or time.monotonic()
        program._moe_first_look = first_look
        skipped: dict[str, str] = {}
        for claim in claims:
            if claim.path == mine:
                if _repo_state(hub, own_repo, files, digest) != "ok":
                    hub.create_repo(own_repo, exist_ok=True)
                    hub.create_commit(own_repo, files,
                                      commit_message=f"{program.peer_id}: the implicit MoE of {collab}")  # fmt: skip
                chosen = claim
                break
            why = claim.problem
            if not why and claim.sha256 != digest:
                why = f"claims MoE {claim.sha256[:12]}, this member builds {digest[:12]}"
            if not why:
                state = _repo_state(hub, claim.repo, files, digest)
                if state == "ok":
                    chosen = claim
                    break
                if state == "pending":
                    if time.monotonic() - first_look < program.terms.round_timeout_s:
                        return None  # its claimer is publishing it: look again at the next step
                    state = f"{claim.repo} not published within {program.terms.round_timeout_s:g} s"
                why = state
            skipped[claim.path] = why
            logger.warning("peer %s: MoE claim %s is skipped: %s", program.peer_id, claim.path, why)
        else:  # pragma: no cover - the own claim was committed above
            raise TermsError(f"peer {program.peer_id}: its MoE claim {mine} is not in {collab}")
        program._moe_built = program._own_expert = None
        return {"moe": {"repo": chosen.repo, "sha256": digest, "claimed_by": chosen.peer, "skipped_claims": skipped}}


PUBLISHERS: dict[str, Publisher] = {
    "per-peer": Publisher(),
    "neighbourhood": NeighbourhoodParts(),
    "cluster": Publisher(),
    "oracle": Publisher(),
    "moe": ImplicitMoE(),
}


def own_cluster_expert(program: Any) -> bool:
    """Form the own cluster's expert as the other clusters' members form it in their exchange (the masked robust
    average of its members' last-round revisions, the own one included), kept as ``program._own_expert``; so every
    member builds the same MoE. False while a member's structure is still being pulled (step again)."""
    if getattr(program, "_own_expert", None) is not None:
        return True
    r, cluster = program.terms.rounds - 1, program._cluster()
    unknown = [m for m in cluster if program.index_of(m) not in program.structure]
    if unknown and program._pull_structures(unknown) is None:
        return False
    updates = {program.peer_id: program._own_from_hub(r)}
    others = [m for m in cluster if m != program.peer_id]
    if others:
        updates.update(program.peer.pull_round(r, others, timeout=0.0, poll_interval=0.0).updates)
    have = [m for m in cluster if m in updates and program.index_of(m) in program.structure]
    ups = [program.kind.with_structure(updates[m], program.structure[program.index_of(m)]) for m in have]
    parts, _ = cluster_expert(ups, [program.plan["weights"][m] for m in have], strategy=program.terms.aggregation,
                              names=have, round=r)  # fmt: skip
    program._own_expert = {program.index_of(m): part for m, part in zip(have, parts) if part is not None}
    return True


def _moe_clusters(program: Any, *, with_parts: bool = False) -> list[tuple[Any, list[int]]]:
    """The MoE's experts in plan order: per cluster with any part, (its parts by member index, or its plan index
    without ``with_parts``; the sorted member indices). The own cluster's expert is :func:`own_cluster_expert`'s
    when it was formed, else the program's view."""
    if not program.experts:
        program.load_experts(program.terms.rounds - 1)
    out = []
    for c, members in enumerate(program.plan["clusters"]):
        if program.peer_id in members:
            parts = getattr(program, "_own_expert", None)
            if parts is None:
                parts = {program.index_of(m): program.view[program.name_of(program.index_of(m))] for m in members
                         if program.name_of(program.index_of(m)) in program.view}  # fmt: skip
        else:
            parts = program.experts.get(c, {})
        if parts:
            out.append((parts if with_parts else c, sorted(parts)))
    return out


def experts_for_moe(program: Any) -> tuple[list[list[Any]], dict[tuple[int, int], dict[str, torch.Tensor]]]:
    """All clusters' experts (:func:`_moe_clusters`: the own one as :func:`own_cluster_expert` formed it, the
    others from its last exchange) and each
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
    from moe_router.centroids import PROTOCOL_POOL, pool_width

    pool = PROTOCOL_POOL  # what the members pooled (Program._prompt_summary)
    centroids = moe_centroids(program, pool_layer=pool, width=pool_width(moe, pool))
    if any(c is not None for c in centroids):
        moe.set_centroids(centroids, pool_layer=pool)
    elif router == "sequence":
        logger.warning("peer %s: no valid centroids from any member: the MoE is published with the implicit router",
                       program.peer_id)  # fmt: skip
        router = "implicit"
    moe.set_router(router=router)


def centroids_path(user: str, peer: str) -> str:
    """Where a member registers its sequence-router centroids in the collaboration repo."""
    return member_file(user, peer, ".centroids.safetensors")


def centroid_bytes(centroids: torch.Tensor, pool_layer: str, *, mean: torch.Tensor | None = None,
                   prompts: int | None = None) -> bytes:  # fmt: skip
    """The centroids file: ``centroids`` (k x d float32) with the pooled layer's key in the metadata; with ``mean``
    (d,) and ``prompts``, also the mean of the pooled prompt vectors and their number (the task signature the
    cluster topology compares members by, :func:`read_prompt_mean`)."""
    tensors = {"centroids": centroids.detach().float().cpu().contiguous()}
    metadata = {"format": CENTROIDS_FORMAT, "pool_layer": pool_layer}
    if mean is not None:
        if prompts is None:
            raise ValueError("a mean needs the number of prompts it averages")
        tensors["mean"] = mean.detach().float().cpu().contiguous()
        metadata["prompts"] = str(int(prompts))
    return save_safetensors(tensors, metadata=metadata)


def _centroid_file(hub: Any, repo_id: str, peer: str, *, revision: str, pool_layer: str,
                   width: int) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:  # fmt: skip
    """A member's centroids file at ``revision``, checked as a whole (size cap, format, tensors, pooling layer,
    the centroids' shape and values); ``TermsError`` saying why otherwise. Returns (tensors, metadata, where)."""
    user, name = peer.split("/", 1)
    path = centroids_path(user, name)
    where = f"{repo_id}/{path}@{revision[:12]}"
    try:
        data = read_capped(hub, repo_id, path, revision, MAX_CENTROID_BYTES)
    except EntryNotFound as exc:
        raise TermsError(f"{where}: no centroids registered") from exc
    try:
        tensors, meta = load_safetensors(data), read_payload_metadata(data)
    except Exception as exc:  # noqa: BLE001 - any parse failure of untrusted bytes is a refusal
        raise TermsError(f"{where}: not a safetensors file: {exc}") from exc
    if set(tensors) not in ({"centroids"}, {"centroids", "mean"}) or meta.get("format") != CENTROIDS_FORMAT:
        raise TermsError(f"{where}: not a {CENTROIDS_FORMAT} file (tensors {sorted(tensors)[:3]})")
    if meta.get("pool_layer") != pool_layer:
        raise TermsError(f"{where}: pooled at {meta.get('pool_layer')!r}, the MoE pools {pool_layer!r}")
    c = tensors["centroids"]
    if c.dtype != torch.float32 or c.ndim != 2 or not 1 <= c.shape[0] <= MAX_CENTROIDS or c.shape[1] != width:
        raise TermsError(f"{where}: centroids must be float32 (1..{MAX_CENTROIDS}) x {width}, got {c.dtype} "
                         f"{tuple(c.shape)}")  # fmt: skip
    if not torch.isfinite(c).all() or bool((c.norm(dim=-1) == 0).any()):
        raise TermsError(f"{where}: centroids must be finite and non-zero")
    return tensors, meta, where


def read_centroids(hub: Any, repo_id: str, peer: str, *, revision: str, pool_layer: str, width: int) -> torch.Tensor:
    """A member's centroids (k x ``width``) at ``revision``, validated; ``TermsError`` saying why otherwise."""
    return _centroid_file(hub, repo_id, peer, revision=revision, pool_layer=pool_layer, width=width)[0]["centroids"]


def read_prompt_mean(hub: Any, repo_id: str, peer: str, *, revision: str, pool_layer: str,
                     width: int) -> tuple[torch.Tensor, int]:  # fmt: skip
    """A member's registered prompt mean (``width``,) and the number of prompts it averages, validated (a float32
    finite vector, an integer count in ``[2, MAX_SUMMARY_PROMPTS]``);
    ``TermsError`` saying why otherwise (also for a file that registered centroids only)."""
    tensors, meta, where = _centroid_file(hub, repo_id, peer, revision=revision, pool_layer=pool_layer, width=width)
    if "mean" not in tensors:
        raise TermsError(f"{where}: registered no prompt mean")
    m, prompts = tensors["mean"], meta.get("prompts", "")
    if m.dtype != torch.float32 or tuple(m.shape) != (width,) or not torch.isfinite(m).all():
        raise TermsError(f"{where}: the prompt mean must be a finite float32 vector of {width}, got {tuple(m.shape)}")
    if not (prompts.isdigit() and 2 <= int(prompts) <= MAX_SUMMARY_PROMPTS):
        raise TermsError(f"{where}: prompts must be an integer in [2, {MAX_SUMMARY_PROMPTS}], got {prompts[:20]!r}")
    return m, int(prompts)


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


def _earlier_final(program: Any, repo: str) -> str | None:
    """This peer's own ``final`` commit on ``main`` from before a restart (its message, a report in its tree), if
    the run stopped between the commit and its tag."""
    messages = {m.format(peer=program.peer_id) for m in _FINAL_MESSAGES}
    try:
        commits = program.hub.list_commits(repo)
    except (RepoNotFound, RevisionNotFound):
        return None
    for commit in commits:  # newest first
        if commit.message in messages and REPORT_FILE in program.hub.list_files(repo, revision=commit.sha):
            return commit.sha
    return None


def _adapter_files(program: Any, me: str) -> dict[str, bytes]:
    """The PEFT adapter of the peer's final own part, naming the hosted base (``base_repo``) when there is one, and
    the base's tokenizer files (so the repo loads with ``AutoPeftModelForCausalLM`` and ``AutoTokenizer``)."""
    program.ws.load_view({me: program.view[me]})
    with tempfile.TemporaryDirectory() as tmp:
        # no embedding layer is ever adapted (SO-LoRA targets Linear/Conv1D only) nor resized: PEFT's "auto" would ask
        # the public Hub for the base's config.json to find that out (a DNS look-up from an offline lab, two warnings)
        program.ws.model.save_pretrained(tmp, selected_adapters=[me], save_embedding_layers=False)
        folder = Path(tmp) / me if (Path(tmp) / me).is_dir() else Path(tmp)
        files = {f.name: f.read_bytes() for f in folder.iterdir() if f.suffix in (".json", ".safetensors")}
    if program.terms.base_repo:
        config = json.loads(files[ADAPTER_CONFIG_FILE])
        config["base_model_name_or_path"] = program.terms.base_repo
        files[ADAPTER_CONFIG_FILE] = json.dumps(config, indent=2, sort_keys=True).encode()
    files.update(tokenizer_files(program.tokenizer))
    return files


def publish_final(program: Any, *, crash_point: Callable[[str], None] = lambda tag: None) -> bool:
    """Publish what the final model needs (the MoE: claimed, then published or verified) and then commit and tag the
    program's ``final`` revision, once, its report naming the MoE. False while the final model waits for other
    members (step again); True when the ``final`` tag is there."""
    repo = program.hub.repo_id(program.peer_id)
    me = program.name_of(program.index)
    publisher = PUBLISHERS[program.spec.final]
    try:
        program.hub.resolve(repo, FINAL_TAG)
        return True
    except RevisionNotFound:
        pass
    earlier = _earlier_final(program, repo)
    if earlier is not None:  # committed before a restart, not tagged: tag that commit, never commit twice
        program.hub.create_tag(repo, FINAL_TAG, revision=earlier, exist_ok=True)
        return True
    published = publisher.publish(program)
    if published is None:
        return False
    crash_point(f"{program.peer_id}:published:{program.terms.rounds - 1}")
    report = {"peer": program.peer_id, "task": program.data.task, "records": program.state["records"],
              "exchanges": program.state["exchanges"], "plan_sha256": program.plan["plan_sha256"], **published}  # fmt: skip
    files = {EXPERT_FILE: program.view[me].to_bytes(), REPORT_FILE: json.dumps(report, indent=1).encode()}
    files.update(publisher.final_files(program))  # what its final model needs besides
    if program.kind.sparse:
        files.update(_adapter_files(program, me))
        card = {"moe_repo": published.get("moe", {}).get("repo"), "base_fingerprint": program.terms.base_fingerprint,
                "pinned_base": program.terms.base_model, "tokenizer_in_repo": True}  # fmt: skip
        publish_adapter(program.peer, files, tag=FINAL_TAG, card=card,
                        base_model=program.terms.base_repo or program.terms.base_model)  # fmt: skip
    else:  # the dense baseline's repo carries no SO-LoRA card: a plain commit, tagged
        sha = program.hub.create_commit(repo, files, commit_message=_FINAL_MESSAGES[1].format(peer=program.peer_id))
        program.hub.create_tag(repo, FINAL_TAG, revision=sha, exist_ok=True)
    return True
