"""The evaluator's read-back: what the peers of one method published on the hub, turned into that method's results.

:meth:`ReadBack.evaluate_method` reads the plan, every member's final part and report back from the hub, scores the
method's final model (:mod:`sorlora.evaluation.final_models`) and the accuracy after each round, and accounts the
bytes the peers reported over the plan's links with the channel model. It moves no data and trains nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peft_sorlora.exchange import UpdateStats
from sorlora_gossip.accounting import round_stats
from sorlora_gossip.layout import EXPERT_FILE, FINAL_TAG, MAX_REPORT_BYTES, REPORT_FILE, UPDATE_FILE, round_tag
from sorlora_gossip.plot import plot_topology
from sorlora_gossip.topology import cluster_collision_rate
from sorlora_gossip.untrusted import read_json

from ..data.examples import Task
from ..methods.specs import MethodSpec
from ..protocol.collab import Collaboration
from ..protocol.plan import plan_graph
from ..protocol.state import load_view, view_path
from ..protocol.terms import CollabTerms
from ..runtime.workspace import Workspace, adapter_name
from .final_models import FINAL_MODELS, Published
from .scoring import fits
from .stats import adjusted_rand_index

__all__ = ["ReadBack"]


@dataclass
class ReadBack:
    """An evaluator of a run's methods: the hub they ran on, the base model, the tasks and how to score them."""

    hub: Any
    base: torch.nn.Module
    base_id: str
    tokenizer: Any
    tasks: Mapping[str, Task]
    eval_kw: dict[str, Any]  # sorlora.evaluation.scoring.evaluate's options (batch_size, max_len, precision)
    n_curve: int = 8  # test questions per task for the accuracy-vs-round curve
    validate: bool = False  # choose router settings on the tasks' validation questions
    dealt: bool = False  # per-peer final models: each question answered by one member
    seed: int = 0  # of the channel model's costs
    progress: bool = False

    def evaluate_method(self, spec: MethodSpec, terms: CollabTerms, collab_id: str, mdir: Path) -> dict[str, Any]:
        """Read the plan, the peers' final parts and reports back from the hub; evaluate; account the bytes.

        ``mdir`` is the method's folder of the run (its ``peers/<adapter name>`` state directories hold the views
        after each round, for the curve). The base model is given back clean in :attr:`base`."""
        collab = Collaboration(self.hub, collab_id)
        plan = collab.read_plan()
        closing = collab.closing()
        regs = {r.peer: r for r in closing.registrations}
        parts, reports = {}, {}
        for peer in plan["members"]:
            repo = self.hub.repo_id(peer)
            sha = self.hub.resolve(repo, FINAL_TAG)
            parts[peer] = spec.kind.payload_cls.from_bytes(self.hub.read_bytes(repo, EXPERT_FILE, revision=sha))
            reports[peer] = read_json(self.hub, repo, REPORT_FILE, revision=sha, max_bytes=MAX_REPORT_BYTES)
        graph = plan_graph(plan)
        plot_topology(graph, mdir / "topology.png", title=f"{spec.name}: {plan['topology']}")
        kw = dict(self.eval_kw)
        ws = Workspace(self.base, self.base_id, terms, spec.kind)
        pub = Published(plan=plan, tasks_of={p: r.task for p, r in regs.items()}, parts=parts, ws=ws,
                        tokenizer=self.tokenizer, hub=self.hub, eval_kw=kw, rank=terms.rank,
                        progress=self.progress, dealt=self.dealt)  # fmt: skip
        try:
            curve = self._curve(pub, mdir, terms)
            validation = None
            if self.validate:
                validation = {t: dataclasses.replace(task, test=task.validation, validation=[])
                              for t, task in self.tasks.items()}  # fmt: skip
            final, extra = FINAL_MODELS[spec.final].evaluate(pub, self.tasks, validation=validation)
        finally:
            self.base = ws.release()
        rounds = [[reports[p]["records"][r] for p in plan["members"]] for r in range(terms.rounds)]
        comm = self._comm(spec, plan, graph, rounds)
        inter_by_round = [0] * terms.rounds
        for rep in reports.values():
            for e in rep.get("exchanges", []):
                inter_by_round[int(e["round"])] += int(e["bytes_pulled"])
        inter = sum(inter_by_round)
        return {
            "method": spec.name,
            "accuracy": final,
            "average": float(np.mean(list(final.values()))),
            "curve": curve,
            "train_loss": [float(np.mean([rec["loss"] for rec in recs])) for recs in rounds],
            # every byte pulled in round r: the neighbours' revisions and the inter-cluster exchange after it
            "bytes_by_round": [
                int(sum(rec.get("bytes_pulled", 0) for rec in recs)) + inter_by_round[r]
                for r, recs in enumerate(rounds)
            ],  # fmt: skip
            "clusters": [[plan["members"].index(p) for p in c] for c in plan["clusters"]],
            "collision_rate": self._collision_rate(spec, plan),
            # how far the clusters follow the tasks (1: one cluster per task; ~0: unrelated); cluster methods only
            "cluster_task_ari": adjusted_rand_index(
                [regs[p].task for p in plan["members"]],
                [next(i for i, c in enumerate(plan["clusters"]) if p in c) for p in plan["members"]],
            )
            if spec.forward == "cluster"
            else None,
            "router": extra.get("router"),
            "routing": extra.get("routing"),  # implicit MoE: share of kept components going to each task's expert
            # implicit MoE: the router it was published with, and per router (the row's and every variant's) the
            # cluster-selection accuracy per task, own-expert share and task x cluster confusion on the test prompts
            "published_router": extra.get("published_router"),
            "routing_diagnostics": extra.get("routing_diagnostics"),
            "unavailable_routers": extra.get("unavailable_routers", {}),
            "per_question": extra.get("per_question"),  # the outcomes behind "accuracy" (paired statistics)
            "variants": extra.get("variants", {}),  # other evaluations of the same weights (e.g. solora's plain sum)
            "refused": extra.get("refused", {}),  # published parts the evaluator refused (peer -> part -> why)
            "n_test": {t: len(task.test) for t, task in self.tasks.items()},
            "inter_cluster_bytes": int(inter),
            "skipped": {
                p: {str(rec["round"]): rec.get("skipped", {}) for rec in rep["records"] if rec.get("skipped")}
                for p, rep in reports.items()
            },  # fmt: skip
            **comm,
            # every byte: the rounds' pulls (comm's figure) plus the inter-cluster exchange
            "round_bytes": comm["bytes_transmitted"],
            "bytes_transmitted": comm["bytes_transmitted"] + int(inter),
        }

    def _curve(self, pub: Published, mdir: Path, terms: CollabTerms) -> list[dict[str, float]]:
        """Accuracy after each round: the mean over every member of its own view after that round (its local
        checkpoint: its adapter and what its forward holds of its cluster's or neighbours' parts).

        Not the final model: no inter-cluster exchange, no implicit-MoE router, no hard routing by task. Its cost is
        bounded like one model's: the first ``n_curve`` test questions of each task that fit ``max_len`` are dealt
        round-robin to the members (member m scores questions m, m + P, ... of them, at least one), so every
        member counts equally and a task costs about ``max(n_curve, P)`` scored questions per round.
        """
        members = pub.plan["members"]
        chosen = {}
        for t, task in self.tasks.items():
            ok = fits(task.test, self.tokenizer, max_len=self.eval_kw["max_len"])
            chosen[t] = [e for e, fit in zip(task.test, ok) if fit][: self.n_curve]
        dealt = [
            {t: [qs[i % len(qs)] for i in range(m, max(len(qs), len(members)), len(members))]
             for t, qs in chosen.items() if qs}
            for m in range(len(members))
        ]  # fmt: skip
        out = []
        for r in range(terms.rounds):
            correct: dict[str, list[int]] = {t: [] for t in chosen if chosen[t]}
            for m in range(len(members)):
                state = mdir / "peers" / adapter_name(m)
                view = load_view(view_path(state, r), terms.spec.kind.payload_cls)
                subset = {t: dataclasses.replace(self.tasks[t], test=qs) for t, qs in dealt[m].items()}
                for t, res in pub.score_view(view, subset).items():
                    correct[t] += [c for c in res["correct"] if c is not None]
            out.append({t: float(np.mean(c)) for t, c in correct.items() if c})
        return out

    def _collision_rate(self, spec: MethodSpec, plan: dict[str, Any]) -> float | None:
        """Mean collision rate of the groups that average B together (clusters, or a peer and its neighbours), from
        the masks in the members' round-0 revisions on the hub."""
        if not spec.kind.sparse:
            return None
        structure = {}
        for p in plan["members"]:
            repo = self.hub.repo_id(p)
            data = self.hub.read_bytes(repo, UPDATE_FILE, revision=self.hub.resolve(repo, round_tag(0)))
            structure[p] = spec.kind.payload_cls.from_bytes(data)
        groups = (
            plan["clusters"] if spec.forward == "cluster" else [[p, *plan["neighbours"][p]] for p in plan["members"]]
        )
        first = structure[plan["members"][0]]
        sizes = [m.numel() for _, m in sorted(first.masks.items())]
        rates = []
        for members in groups:
            s = [[float(m.float().mean()) for _, m in sorted(structure[p].masks.items())] for p in members]
            rates.append(cluster_collision_rate(s, layer_weights=sizes))
        return float(np.mean(rates))

    def _comm(self, spec: MethodSpec, plan: dict[str, Any], graph: Any, rounds: list[list[dict]]) -> dict[str, Any]:
        """Communication per round from the peers' own reports over the plan's links (channel model costs)."""
        n = len(plan["members"])
        comm = []
        for recs in rounds:
            payloads = {i: UpdateStats(params_updated=rec["params_updated"], params_transmitted=rec["params_transmitted"],
                                       bytes=rec["bytes_pushed"], value_bytes=rec["value_bytes"])
                        for i, rec in enumerate(recs)}  # fmt: skip
            comm.append(round_stats(graph, payloads, method=spec.name, seed=self.seed).as_dict())
        links = max((c["num_links"] for c in comm), default=0)
        params_sent = sum(c["params_sent"] for c in comm)
        return {
            "params_updated": int(np.mean([rounds[0][i]["params_updated"] for i in range(n)])),
            "params_transmitted_per_round": params_sent / len(comm) / links if links else 0.0,
            "bytes_transmitted": int(sum(rec.get("bytes_pulled", 0) for recs in rounds for rec in recs)),
            "bytes_pushed": int(sum(rec["bytes_pushed"] for recs in rounds for rec in recs)),
            "delay_s": float(sum(c["delay_s"] for c in comm)),
            "energy_j": float(sum(c["energy_j"] for c in comm)),
            "links_per_round": links,
        }
