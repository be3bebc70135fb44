"""The simulation: for every method, a collaboration of N peers on a hub, then an evaluation of what they published.

For every method (sorlora/methods.py) the runner writes the collaboration's terms to the hub, launches N peers on an
engine (sorlora/engines.py: in this process around one shared base model, as OS processes, or as Ray actors) and
waits. The peers do everything else themselves, exactly as devices would (sorlora/peer_program.py): register,
agree on the plan by determinism, calibrate, train and exchange through the hub, exchange between clusters,
publish. The runner then reads back from the hub what the peers published (plan, final adapters, implicit MoE,
their reports) and evaluates it on every task's test split. It computes no topology and moves no data itself.
A killed run continues where it stopped (each peer resumes from its state directory and its revisions on the hub)
and yields the same table.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peft_sorlora.base_model import base_fingerprint
from peft_sorlora.exchange import UpdateStats
from sorlora_gossip import Hub, LocalHub
from sorlora_gossip.accounting import round_stats
from sorlora_gossip.hub import HfHub
from sorlora_gossip.layout import UPDATE_FILE, round_tag
from sorlora_gossip.plot import plot_topology
from sorlora_gossip.topology import cluster_collision_rate
from sorlora_gossip.wireless import place_peers

from .collab import Collaboration, create_collaboration
from .config import ExperimentConfig
from .engines import PeerLaunch, make_engine
from .final_models import FINAL_MODELS, Published
from .methods import METHOD_SPECS, MethodSpec
from .peer_program import CRASH_ENV, EXPERT_FILE, FINAL_TAG, REPORT_FILE, TINY_BASE_ID, load_base
from .plan import plan_graph
from .stats import adjusted_rand_index
from .tasks import Task, load_task, synthetic_task
from .terms import CollabTerms
from .workspace import Workspace, adapter_name

__all__ = [
    "Runner",
    "run_experiment",
    "check_run_dir_settings",
    "load_tasks",
    "load_model",
    "terms_for",
    "CRASH_ENV",
    "write_json",
]


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a crash never leaves half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def load_tasks(cfg: ExperimentConfig) -> dict[str, Task]:
    """The run's tasks with fixed splits; names starting with ``synthetic-`` are generated (tests)."""
    tasks = {}
    for name in cfg.tasks:
        sizes = dict(n_train=cfg.n_train, n_test=cfg.n_test, n_validation=cfg.n_validation, seed=cfg.seed)
        loader = synthetic_task if name.startswith("synthetic-") else load_task
        tasks[name] = loader(name, **sizes)
    return tasks


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when a GPU is visible (e.g. to a Ray actor given one), else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(cfg: ExperimentConfig) -> tuple[torch.nn.Module, Any, str]:
    """(base model, tokenizer, portable base id) for ``cfg.model`` (``tiny-random``: a tiny Llama for tests)."""
    if cfg.model == "tiny-random":
        model, tokenizer = load_base(TINY_BASE_ID)
        return model, tokenizer, TINY_BASE_ID
    from peft_sorlora.base_model import BUNDLED_BASE_ID, load_base_model

    model, tokenizer = load_base_model(cfg.model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer, model.name_or_path or BUNDLED_BASE_ID


def open_run_hub(cfg: ExperimentConfig, run_dir: Path) -> tuple[Hub, str]:
    """The hub of a run and its location: a Hub endpoint if ``cfg.hub`` is set, else a LocalHub in the run dir."""
    if cfg.hub:
        return HfHub(endpoint=cfg.hub, namespace=cfg.hub_namespace), cfg.hub
    return LocalHub(run_dir / "hub", namespace=cfg.hub_namespace), str(run_dir / "hub")


def task_shards(cfg: ExperimentConfig, tasks: Mapping[str, Task]) -> dict[int, list]:
    """Each peer's training data: peers that share a task split its training set between them."""
    shards: dict[int, list] = {}
    for task in tasks.values():
        holders = [p for p in range(cfg.peers) if cfg.task_of(p) == task.name]
        for k, peer in enumerate(holders):
            shards[peer] = task.train[k :: len(holders)]
    empty = [p for p in range(cfg.peers) if not shards.get(p)]
    if empty:
        raise ValueError(f"peers {empty} have no training data: raise n_train or lower peers")
    return shards


def terms_for(cfg: ExperimentConfig, method: str, *, base_model: str, fingerprint: str) -> CollabTerms:
    """The collaboration terms the simulation of ``method`` runs under (every peer pins them)."""
    return CollabTerms(
        base_model=base_model, base_fingerprint=fingerprint, method=method, rank=cfg.rank, lora_alpha=cfg.lora_alpha,
        target_modules=tuple(cfg.target_modules), sparsity=cfg.sparsity, sparsity_allocation=cfg.sparsity_allocation,
        payload_dtype=cfg.payload_dtype, seed=cfg.seed, rounds=cfg.rounds, local_steps=cfg.local_steps,
        batch_size=cfg.batch_size, max_len=cfg.max_len, lr=float(cfg.lr[method]), precision=cfg.precision,
        inter_cluster_every=cfg.inter_cluster_every, s_max=cfg.s_max, degree=cfg.degree,
        router_top_k=cfg.router_top_k, router_refine=cfg.router_refine, max_members=cfg.peers,
        round_timeout_s=cfg.pull_timeout, publish_base=base_model == TINY_BASE_ID,
    )  # fmt: skip


def peer_repo(cfg: ExperimentConfig, method: str, peer: int) -> str:
    """The simulated peer ``peer``'s repo id in ``method`` (sorted ids follow peer numbers)."""
    return f"{cfg.hub_namespace}/{method}-{adapter_name(peer)}"


def check_run_dir_settings(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Raise ValueError if ``run_dir`` already holds a run with other settings (its ``config.json``).

    The same settings resume that run; the CLI calls this before any model loads, the runner before it starts.
    """
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return
    stored = ExperimentConfig.from_file(path)
    if stored.fingerprint() != cfg.fingerprint():
        raise ValueError(
            f"{run_dir} holds a run with other settings (config fingerprint {stored.fingerprint()} vs "
            f"{cfg.fingerprint()}): use another --run-dir, the same settings to resume, or delete the folder"
        )


class Runner:
    """Runs (or resumes) one simulation in ``run_dir``; see the module docstring."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: str | Path,
        *,
        progress: bool = True,
        base: tuple[torch.nn.Module, Any, str] | None = None,
        hub: Hub | None = None,
        tasks: Mapping[str, Task] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress
        self._base = base
        self._hub = hub
        self._tasks = dict(tasks) if tasks is not None else None

    # ------------------------------------------------------------------ set-up
    def _prepare_dir(self) -> None:
        """Refuse a run directory holding other settings (before anything is loaded)."""
        check_run_dir_settings(self.cfg, self.run_dir)

    def _record_config(self) -> None:
        """Claim the run directory for these settings, once model and data loaded (a failed start claims nothing)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "config.json"
        if not path.exists():
            write_json(path, self.cfg.to_dict())

    def _load(self) -> None:
        self.base, self.tokenizer, self.base_id = self._base or load_model(self.cfg)
        self.base.to(resolve_device(self.cfg.device))
        self.fingerprint = base_fingerprint(self.base)
        self.tasks = self._tasks if self._tasks is not None else load_tasks(self.cfg)
        if self._hub is not None:
            self.hub, self.hub_location = self._hub, getattr(self._hub, "endpoint", None) or str(self._hub.root)
        else:
            self.hub, self.hub_location = open_run_hub(self.cfg, self.run_dir)
        self.hub = self.hub
        self.shards = task_shards(self.cfg, self.tasks)

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        """Run every method (resuming finished parts), then write results.json, results.md and the plots."""
        from .report import write_report

        self._prepare_dir()
        self._load()
        self._record_config()
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        results = {method: self.run_method(method) for method in self.cfg.methods}
        summary = {
            "config": self.cfg.to_dict(),
            "base_model": self.base_id,
            "base_params": sum(p.numel() for p in self.base.parameters()),
            "methods": results,
        }
        write_json(self.run_dir / "results.json", summary)
        write_report(summary, self.run_dir)
        return summary

    def collab_id(self, method: str) -> str:
        return f"{self.cfg.hub_namespace}/collab-{method}"

    def run_method(self, method: str) -> dict[str, Any]:
        """Run one method's collaboration and evaluate it; a finished method is read back from its ``final.json``."""
        mdir = self.run_dir / "methods" / method
        mdir.mkdir(parents=True, exist_ok=True)
        final_path = mdir / "final.json"
        if final_path.exists():
            return json.loads(final_path.read_text())
        spec = METHOD_SPECS[method]
        started = time.perf_counter()
        terms = terms_for(self.cfg, method, base_model=self.base_id, fingerprint=self.fingerprint)
        create_collaboration(self.hub, self.collab_id(method), terms, exist_ok=True)
        positions = place_peers(self.cfg.peers, seed=self.cfg.seed)
        launches = [
            PeerLaunch(peer_id=peer_repo(self.cfg, method, p), task=self.cfg.task_of(p), train=self.shards[p],
                       state_dir=mdir / "peers" / adapter_name(p),
                       position_mm=(int(round(positions[p, 0] * 1000)), int(round(positions[p, 1] * 1000))))
            for p in range(self.cfg.peers)
        ]  # fmt: skip
        engine = make_engine(self.cfg.engine, base=self.base, tokenizer=self.tokenizer, progress=self.progress,
                             hub_location=self.hub_location, model=self.cfg.model, threads=self.cfg.threads or 1,
                             cfg=self.cfg)  # fmt: skip
        engine.run(self.hub, self.collab_id(method), launches, desc=f"{method}: peers")
        result = self.evaluate_method(spec, terms, mdir)
        result["seconds"] = time.perf_counter() - started
        write_json(final_path, result)
        return result

    # ------------------------------------------------------------------ evaluation of what was published
    def evaluate_method(self, spec: MethodSpec, terms: CollabTerms, mdir: Path) -> dict[str, Any]:
        """Read the plan, the peers' final parts and reports back from the hub; evaluate; account the bytes."""
        collab = Collaboration(self.hub, self.collab_id(spec.name))
        plan = collab.read_plan()
        closing = collab.closing()
        regs = {r.peer: r for r in closing.registrations}
        parts, reports = {}, {}
        for peer in plan["members"]:
            repo = self.hub.repo_id(peer)
            sha = self.hub.resolve(repo, FINAL_TAG)
            parts[peer] = spec.kind.payload_cls.from_bytes(self.hub.read_bytes(repo, EXPERT_FILE, revision=sha))
            reports[peer] = json.loads(self.hub.read_bytes(repo, REPORT_FILE, revision=sha))
        graph = plan_graph(plan)
        plot_topology(graph, mdir / "topology.png", title=f"{spec.name}: {plan['topology']}")
        kw = self.cfg.eval_kwargs()
        ws = Workspace(self.base, self.base_id, terms, spec.kind)
        pub = Published(plan=plan, tasks_of={p: r.task for p, r in regs.items()}, parts=parts, ws=ws,
                        tokenizer=self.tokenizer, hub=self.hub, eval_kw=kw, rank=terms.rank,
                        progress=self.progress, dealt=self.cfg.score_members == "dealt")  # fmt: skip
        try:
            curve = self._curve(pub, mdir, terms)
            validation = None
            if self.cfg.n_validation > 0:
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
        from .evaluation import fits
        from .peer_program import _load_view

        members = pub.plan["members"]
        chosen = {}
        for t, task in self.tasks.items():
            ok = fits(task.test, self.tokenizer, max_len=self.cfg.max_len)
            chosen[t] = [e for e, fit in zip(task.test, ok) if fit][: self.cfg.n_curve]
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
                view = _load_view(state / f"view-{r:04d}.safetensors", terms.spec.kind.payload_cls)
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
            comm.append(round_stats(graph, payloads, method=spec.name, seed=self.cfg.seed).as_dict())
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


def run_experiment(cfg: ExperimentConfig, run_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume) the simulation described by ``cfg`` in ``run_dir``; returns the results summary."""
    return Runner(cfg, run_dir, **kwargs).run()
