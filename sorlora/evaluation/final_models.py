"""How an evaluator scores each kind of final model (one entry per kind in :data:`FINAL_MODELS`), reading what the
peers published on the hub (what a peer publishes: :mod:`sorlora.protocol.publish`).

- ``per-peer``: every peer's own final adapter (mean accuracy over peers);
- ``neighbourhood``: every peer's own final adapter plus the parts of its neighbours' updates its last average
  kept, which it publishes with its final adapter (LoRI; mean accuracy over peers);
- ``cluster``: the adapters of one cluster's members active together (one model: all members hold the same);
- ``oracle``: per task, the cluster of the peers holding it (hard routing upper bound);
- ``moe``: the collaboration's one implicit MoE of all clusters' experts, a ``PreTrainedModel`` repo published
  once (every member builds the same, the first to claim it publishes it); the evaluator loads the one the first
  member's ``report.json`` names. Its row is the
  published router (the terms' ``router``); the same weights are also scored under every other router of
  :data:`EVAL_ROUTERS` (``variants``: ``solora:implicit``, ``solora:sequence``, ...; ``hard`` routes each task to the
  cluster holding it), and every router's routing diagnostics (cluster-selection accuracy per task against the true
  task's cluster, own-expert share, task x cluster confusion) are reported on the test prompts alone. The same
  experts, exported as PEFT LoRA adapters (``moe_router.export_loras``), are also scored through PEFT's own Arrow
  router (``solora:arrow``, :data:`EVAL_ANCHORS`): the published training-free router the others are measured against.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from moe_router import ImplicitMoEForCausalLM, arrow_model, export_loras, routing_diagnostics, routing_shares
from moe_router.configuration import REFINE_MODES
from sorlora_gossip.hub.base import EntryNotFound, RequestTooLarge
from sorlora_gossip.layout import FINAL_TAG, MAX_REPORT_BYTES, NEIGHBOURHOOD_DIR, REPORT_FILE
from sorlora_gossip.untrusted import read_json

from ..data.examples import Task
from ..runtime.moe import load_moe
from ..runtime.precision import autocast
from ..runtime.workspace import Workspace, adapter_name
from .scoring import PromptTooLongError, _encode_question, evaluate, fits, mean_per_question, per_question

__all__ = [
    "ARROW_TOP_K",
    "EVAL_ANCHORS",
    "EVAL_ROUTERS",
    "FINAL_MODELS",
    "FinalModel",
    "Published",
    "arrow_accuracy",
    "choose_router",
    "evaluate_moe",
    "own_expert_shares",
    "router_diagnostics",
    "score",
]

logger = logging.getLogger(__name__)

EVAL_ROUTERS = ("implicit", "sequence", "spectral", "sum", "hard")  # every router the MoE's weights are scored under
EVAL_ANCHORS = ("arrow",)  # the same experts under another library's router (PEFT's Arrow over their LoRA exports)
ARROW_TOP_K = 3  # experts Arrow mixes per token (PEFT ArrowConfig's default; at most the number of experts)


def arrow_accuracy(
    moe: ImplicitMoEForCausalLM, base: torch.nn.Module, tasks: Mapping[str, Task], tokenizer: Any, **eval_kw: Any
) -> dict[str, dict[str, Any]]:
    """Scores of the MoE's experts through PEFT's Arrow: each expert exported as an exact LoRA adapter (the same
    rank for all, as Arrow requires), loaded with ``peft.create_arrow_model`` on ``base`` (a clean base copy, which
    it wraps), Arrow mixing the top ``min(ARROW_TOP_K, experts)`` experts per token by their singular directions.
    Always in float32: PEFT 0.21's Arrow forward fails under bfloat16 autocast (its ``scatter_`` mixes dtypes)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_loras(moe, tmp)
        model = arrow_model(base, paths, top_k=min(ARROW_TOP_K, moe.num_experts)).eval()
    return score(model, tokenizer, tasks, **{**eval_kw, "precision": "float32"})


def evaluate_moe(
    moe: ImplicitMoEForCausalLM,
    tasks: Mapping[str, Task],
    tokenizer: Any,
    *,
    progress: bool = False,
    **eval_kw: Any,
) -> dict[str, float]:
    """Accuracy per task of the implicit MoE (``eval_kw``: :func:`~sorlora.evaluation.scoring.evaluate`'s options)."""
    out = {}
    for name, task in tqdm(tasks.items(), desc="evaluate MoE", disable=not progress, leave=False):
        out[name] = evaluate(moe, tokenizer, task, **eval_kw)["accuracy"]
    return out


def choose_router(
    moe: ImplicitMoEForCausalLM,
    validation: Mapping[str, Task],
    tokenizer: Any,
    *,
    rank: int,
    **eval_kw: Any,
) -> dict[str, Any]:
    """Pick the routing settings (k in {r, 2r, all} x refinement) with the best mean accuracy on validation tasks.

    The chosen settings are applied to ``moe``; ``eval_kw`` are :func:`~sorlora.evaluation.scoring.evaluate`'s options.
    The router itself is never trained; only this one setting is chosen, on held-out questions, never on test ones.
    """
    scores: dict[str, float] = {}
    best: tuple[float, str, int | str, str] | None = None
    for top_k in (rank, 2 * rank, "all"):
        for refine in REFINE_MODES:
            moe.set_router(top_k=top_k, refine=refine)
            acc = evaluate_moe(moe, validation, tokenizer, **eval_kw)
            label = f"k={top_k},refine={refine}"
            scores[label] = sum(acc.values()) / len(acc)
            if best is None or scores[label] > best[0]:
                best = (scores[label], label, top_k, refine)
    _, label, top_k, refine = best
    moe.set_router(top_k=top_k, refine=refine)
    return {"router_top_k": top_k, "refine": refine, "chosen": label, "validation": scores}


@dataclass
class Published:
    """What an evaluator read back from the hub for one method: the plan, each member's task and final part."""

    plan: dict[str, Any]
    tasks_of: dict[str, str]
    parts: dict[str, Any]  # peer id -> its final own part (with structure), from its ``final`` revision
    ws: Workspace
    tokenizer: Any
    hub: Any
    eval_kw: dict[str, Any]
    rank: int
    progress: bool = False
    dealt: bool = False  # per-peer final models: each question answered by one member (score_members="dealt")

    def view(self, peers: Sequence[str]) -> dict[str, Any]:
        """The adapters of ``peers`` under their plan names (to activate together)."""
        index = {p: i for i, p in enumerate(self.plan["members"])}
        return {adapter_name(index[p]): self.parts[p] for p in peers if p in self.parts}

    def score_view(self, view: Mapping[str, Any], tasks: Mapping[str, Task]) -> dict[str, dict[str, Any]]:
        """Full :func:`~sorlora.evaluation.scoring.evaluate` results (per-question outcomes included) of ``view``."""
        self.ws.load_view(view)
        self.ws.activate(list(view))
        return score(self.ws.network, self.tokenizer, tasks, **self.eval_kw)

    def evaluate_view(self, view: Mapping[str, Any], tasks: Mapping[str, Task]) -> dict[str, float]:
        return {t: r["accuracy"] for t, r in self.score_view(view, tasks).items()}


def score(model: Any, tokenizer: Any, tasks: Mapping[str, Task], **eval_kw: Any) -> dict[str, dict[str, Any]]:
    """:func:`~sorlora.evaluation.scoring.evaluate` of one model on every task."""
    return {t: evaluate(model, tokenizer, task, **eval_kw) for t, task in tasks.items()}


def _accuracy(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    return {t: r["accuracy"] for t, r in results.items()}


def own_expert_shares(
    moe: ImplicitMoEForCausalLM,
    tasks: Mapping[str, Task],
    tokenizer: Any,
    own: Mapping[str, int],
    *,
    batch_size: int = 16,
    max_len: int = 256,
    precision: str = "float32",
) -> dict[str, dict[str, Any]]:
    """Per task, the share of the components the router keeps that belong to the task's own expert (``own[t]``: the
    expert of the cluster holding it), over the real tokens of its test prompts, beside the uniform share 1/E.

    A diagnostic of why the implicit MoE may lose to hard routing: a share near 1/E means the frozen projections
    do not tell the tasks apart, and every token mixes every cluster's update.
    """
    out = {}
    device = next(moe.parameters()).device
    for t, task in tasks.items():
        totals = torch.zeros(moe.num_experts, dtype=torch.float64)
        prompts = [e.prompt for e in task.test]
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                              truncation=True, max_length=max_len)  # fmt: skip
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            with autocast(precision, device):
                shares = routing_shares(moe, batch)
            totals += shares.double() * int(batch["attention_mask"].sum())
        shares = (totals / totals.sum()).tolist()
        out[t] = {"own_expert": int(own[t]), "own_share": float(shares[own[t]]), "uniform": 1.0 / moe.num_experts,
                  "shares": [float(x) for x in shares]}  # fmt: skip
    return out


def _prompt_batches(
    tasks: Mapping[str, Task], tokenizer: Any, *, batch_size: int, max_len: int
) -> list[tuple[dict[str, torch.Tensor], list[str]]]:
    """The test prompts (the questions alone, tokenized and cut as scoring does), right-padded, with their tasks."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n_special = len(tokenizer("", add_special_tokens=True)["input_ids"])
    out = []
    for t, task in tasks.items():
        ok = fits(task.test, tokenizer, max_len=max_len)
        contexts = [_encode_question(e, tokenizer, max_len=max_len, n_special=n_special)[0]
                    for e, fit in zip(task.test, ok) if fit]  # fmt: skip
        for start in range(0, len(contexts), batch_size):
            chunk = contexts[start : start + batch_size]
            width = max(len(c) for c in chunk)
            batch = {"input_ids": torch.tensor([c + [pad] * (width - len(c)) for c in chunk]),
                     "attention_mask": torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in chunk])}  # fmt: skip
            out.append((batch, [t] * len(chunk)))
    return out


def router_diagnostics(
    moe: ImplicitMoEForCausalLM,
    tasks: Mapping[str, Task],
    tokenizer: Any,
    own: Mapping[str, int],
    *,
    routers: Sequence[str] = EVAL_ROUTERS,
    batch_size: int = 16,
    max_len: int = 256,
    precision: str = "float32",
    **_: Any,
) -> dict[str, dict[str, Any]]:
    """Per router (the model's settings otherwise), :func:`moe_router.routing_diagnostics` on the test prompts:
    per task the cluster-selection accuracy against ``own[t]`` (the cluster holding the task), the own-expert share
    and the task x cluster confusion; plus ``selected`` (per prompt, in task and test order) and ``min_accuracy``.
    A router that cannot run on this model (``sequence`` without centroids) gets ``{"unavailable": why}``."""
    device = next(moe.parameters()).device
    batches = [({k: v.to(device) for k, v in b.items()}, ts)
               for b, ts in _prompt_batches(tasks, tokenizer, batch_size=batch_size, max_len=max_len)]  # fmt: skip
    out: dict[str, dict[str, Any]] = {}
    for name in routers:
        try:
            with moe.router_settings(router=name), autocast(precision, device):
                diag = routing_diagnostics(moe, batches, dict(own))
        except ValueError as exc:
            out[name] = {"unavailable": str(exc)}
            continue
        out[name] = {**diag.to_dict(), "selected": list(diag.selected), "min_accuracy": diag.min_accuracy}
    return out


class FinalModel:
    """How an evaluator scores one kind of final model."""

    def evaluate(self, pub: Published, tasks: Mapping[str, Task], *, validation: Mapping[str, Task] | None) -> tuple:
        """(accuracy per task, extra result fields). The extra fields hold ``per_question`` (the outcomes behind the
        accuracies, for paired statistics) and may hold ``variants``: other evaluations of the same weights,
        ``{name: {"accuracy": ..., "per_question": ...}}``."""
        raise NotImplementedError


def _holder_cluster(pub: Published, task: str) -> int:
    """Index in the plan of the cluster holding most of the peers whose task is ``task`` (hard routing by task)."""
    holders = [p for p in pub.plan["members"] if pub.tasks_of[p] == task]
    clusters = pub.plan["clusters"]
    return max(range(len(clusters)), key=lambda c: sum(p in clusters[c] for p in holders))


class PerPeer(FinalModel):
    """Every member's own model, scored on every task; the accuracy is the mean over members."""

    @staticmethod
    def peer_view(pub: Published, peer: str) -> tuple[dict[str, Any], dict[str, str]]:
        """``peer``'s model as read back from the hub, and the published parts refused (with why): its own adapter."""
        return pub.view([peer]), {}

    def evaluate(self, pub, tasks, *, validation):
        members = pub.plan["members"]
        if pub.dealt:  # each question that fits max_len to one member, round-robin: (task, index) lists per member
            fitting = {t: [i for i, ok in enumerate(fits(task.test, pub.tokenizer, max_len=pub.eval_kw["max_len"]))
                           if ok] for t, task in tasks.items()}  # fmt: skip
            for t, idx in fitting.items():
                if not idx:
                    raise PromptTooLongError(f"task {t!r}: none of its {len(tasks[t].test)} test questions fits "
                                             f"max_len={pub.eval_kw['max_len']} tokens")  # fmt: skip
            dealt = [{t: idx[m :: len(members)] for t, idx in fitting.items()} for m in range(len(members))]
        results, refused = [], {}
        for m, p in enumerate(tqdm(members, desc="evaluate peers", disable=not pub.progress, leave=False)):
            view, bad = self.peer_view(pub, p)
            if bad:
                refused[p] = bad
            mine = tasks if not pub.dealt else {
                t: dataclasses.replace(tasks[t], test=[tasks[t].test[i] for i in idx])
                for t, idx in dealt[m].items() if idx
            }  # fmt: skip
            results.append(pub.score_view(view, mine))
        if not pub.dealt:
            accuracy = {t: float(np.mean([r[t]["accuracy"] for r in results])) for t in tasks}
            return accuracy, {"per_question": mean_per_question([per_question(r) for r in results]),
                              "refused": refused}  # fmt: skip
        outcomes = {t: {"correct": [None] * len(task.test), "correct_norm": [None] * len(task.test)}
                    for t, task in tasks.items()}  # fmt: skip
        for m, result in enumerate(results):
            for t, idx in dealt[m].items():
                for key in ("correct", "correct_norm"):
                    for j, i in enumerate(idx):
                        outcomes[t][key][i] = result[t][key][j]
        accuracy = {t: float(np.mean([c for c in o["correct"] if c is not None])) for t, o in outcomes.items()}
        return accuracy, {"per_question": outcomes, "refused": refused}


class Neighbourhood(PerPeer):
    """A peer's model is its whole final view: its own adapter and its neighbours' parts of its last average."""

    @staticmethod
    def peer_view(pub: Published, peer: str) -> tuple[dict[str, Any], dict[str, str]]:
        """``peer``'s final view read from its ``final`` revision, and the neighbour parts refused (with why).

        Each part must parse as a payload of the pinned base under its neighbour's config, with the masks of that
        neighbour's own final part; a part the peer did not publish (its neighbour was skipped) is simply absent.
        """
        index = {p: i for i, p in enumerate(pub.plan["members"])}
        repo = pub.hub.repo_id(peer)
        sha = pub.hub.resolve(repo, FINAL_TAG)
        view = pub.view([peer])
        refused: dict[str, str] = {}
        for q in pub.plan["neighbours"][peer]:
            theirs = pub.parts.get(q)
            if theirs is None:
                continue
            path = f"{NEIGHBOURHOOD_DIR}/{adapter_name(index[q])}.safetensors"
            try:
                data = pub.hub.read_bytes(repo, path, revision=sha, max_bytes=theirs.max_bytes(structure=True))
                part = type(theirs).from_bytes(data, expected_base_model=theirs.base_model,
                                               expected_config_hash=theirs.config_hash)  # fmt: skip
                if not part.has_structure or set(part.masks) != set(theirs.masks) or not all(
                    torch.equal(part.masks[k], theirs.masks[k]) for k in theirs.masks
                ):  # fmt: skip
                    raise ValueError(f"its masks are not those of {q}'s own final adapter")
            except EntryNotFound:
                continue
            except (ValueError, RequestTooLarge) as exc:  # PayloadError is a ValueError
                refused[q] = f"{repo}/{path}@{sha[:12]}: {exc}"
                logger.warning("final model of %s: refusing the part of %s: %s", peer, q, refused[q])
                continue
            view[adapter_name(index[q])] = part
        return view, refused


class OneCluster(FinalModel):
    def evaluate(self, pub, tasks, *, validation):
        results = pub.score_view(pub.view(pub.plan["clusters"][0]), tasks)
        return _accuracy(results), {"per_question": per_question(results)}


class Oracle(FinalModel):
    def evaluate(self, pub, tasks, *, validation):
        results = {}
        for t, task in tasks.items():
            cluster = pub.plan["clusters"][_holder_cluster(pub, t)]
            results[t] = pub.score_view(pub.view(cluster), {t: task})[t]
        return _accuracy(results), {"per_question": per_question(results)}


def _moe_repo(pub: Any) -> str:
    """The collaboration's MoE repo, as the first member's ``report.json`` names it (key ``moe``, validated: a repo
    id named ``<collab>-moe`` in some member's namespace)."""
    first = pub.plan["members"][0]
    repo = pub.hub.repo_id(first)
    report = read_json(pub.hub, repo, REPORT_FILE, revision=FINAL_TAG, max_bytes=MAX_REPORT_BYTES)
    named = (
        report.get("moe", {}).get("repo") if isinstance(report, dict) and isinstance(report.get("moe"), dict) else None
    )
    users = {m.split("/")[0] for m in pub.plan["members"]}
    if not isinstance(named, str) or named.count("/") != 1 or named.split("/")[0] not in users or not named.endswith(
        "-moe"
    ):  # fmt: skip
        raise ValueError(f"{repo}/{REPORT_FILE}@{FINAL_TAG} names no MoE repo of a member (key 'moe'): {named!r}")
    return pub.hub.repo_id(named)


class ImplicitMoE(FinalModel):
    """The collaboration's implicit MoE, which the first member's report names (every member builds the same one and
    names the one published first)."""

    def evaluate(self, pub, tasks, *, validation):
        moe = load_moe(pub.hub, _moe_repo(pub), pub.ws)
        router = None
        if validation:
            router = choose_router(moe, validation, pub.tokenizer, rank=pub.rank, **pub.eval_kw)
        results = score(moe, pub.tokenizer, tasks, **pub.eval_kw)
        published = moe.config.router
        one_per_cluster = moe.num_experts == len(pub.plan["clusters"])
        variants, unavailable = {}, {}
        # The same weights under every other router: sum (every component of every cluster kept), implicit,
        # sequence, spectral, and hard routing by the true task (only the expert of the cluster that holds it).
        for name in EVAL_ROUTERS:
            if name == published or (name == "hard" and not one_per_cluster):
                continue
            try:
                if name == "hard":
                    got = {}
                    with moe.router_settings(router="hard"):
                        for t, task in tasks.items():
                            with moe.routed(_holder_cluster(pub, t)):
                                got[t] = evaluate(moe, pub.tokenizer, task, **pub.eval_kw)
                else:
                    with moe.router_settings(router=name, refine="none" if name == "sum" else None):
                        got = score(moe, pub.tokenizer, tasks, **pub.eval_kw)
            except ValueError as exc:  # e.g. sequence without centroids
                unavailable[name] = str(exc)
                continue
            variants[name] = {"accuracy": _accuracy(got), "per_question": per_question(got)}
        # the anchor: the same experts under PEFT's Arrow (never the published model; its own copy of the base)
        got = arrow_accuracy(moe, pub.ws.clean_copy(), tasks, pub.tokenizer, **pub.eval_kw)
        variants["arrow"] = {"accuracy": _accuracy(got), "per_question": per_question(got)}
        extra = {"router": router, "published_router": published, "moe_config": json.loads(moe.config.to_json_string())}
        if unavailable:
            extra["unavailable_routers"] = unavailable
        if one_per_cluster:
            own = {t: _holder_cluster(pub, t) for t in tasks}
            extra["routing"] = own_expert_shares(moe, tasks, pub.tokenizer, own, **pub.eval_kw)
            extra["routing_diagnostics"] = router_diagnostics(moe, tasks, pub.tokenizer, own, **pub.eval_kw)
        return _accuracy(results), {**extra, "per_question": per_question(results), "variants": variants}


FINAL_MODELS: dict[str, FinalModel] = {
    "per-peer": PerPeer(),
    "neighbourhood": Neighbourhood(),
    "cluster": OneCluster(),
    "oracle": Oracle(),
    "moe": ImplicitMoE(),
}
