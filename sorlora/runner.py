"""The decentralized experiment: N peers, one task each, fine-tune one base model together through a hub.

For every method (sorlora/methods.py) each peer creates its adapter and calibrates its SO-LoRA masks on its own
data; the driver builds the method's topology from what the peers report; then ``rounds`` rounds of: local training
(a fresh AdamW, the same batches for every method) -> push one revision per peer -> pull the neighbours' revisions of
that round (pinned to their ``round-N`` tags) -> aggregate. Peers run on an engine (in-process or Ray actors) and
talk only through the hub. Each peer checkpoints its view after every round and the driver records every finished
round, so a killed run continues where it stopped and yields the same table. Finally every peer's model is
evaluated on every task's test split (each distinct model once).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch
from tqdm.auto import tqdm

from model_cards import ExpertInfo, MoECardInfo
from peft_sorlora import SparseUpdate, update_stats
from peft_sorlora.base_model import load_base_model
from peft_sorlora.exchange import UpdateStats
from sorlora_gossip import Hub, LocalHub
from sorlora_gossip.accounting import round_stats
from sorlora_gossip.dense import DenseUpdate
from sorlora_gossip.hub import HfHub
from sorlora_gossip.plot import plot_topology
from sorlora_gossip.topology import cluster_collision_rate, cluster_topology, random_topology, single_cluster
from sorlora_gossip.wireless import place_peers

from .config import ExperimentConfig
from .engines import make_engine
from .evaluation import evaluate
from .final_models import build_moe, choose_router, evaluate_moe
from .methods import METHOD_SPECS, MethodSpec
from .model_loading import tiny_random_model
from .peer_worker import (
    CALIBRATION,
    CRASH_ENV,
    PeerPlan,
    checkpoint_path,
    load_view,
    peer_batches,
    round_record,
    write_json,
)
from .tasks import Task, load_task, synthetic_task
from .workspace import Workspace, adapter_name

__all__ = ["Runner", "run_experiment", "load_tasks", "CRASH_ENV"]


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
    """(base model, tokenizer, base model id) for ``cfg.model`` (``tiny-random``: a tiny Llama for tests)."""
    if cfg.model == "tiny-random":
        model, tokenizer = tiny_random_model(seed=cfg.seed)
        return model, tokenizer, "tiny-random-llama"
    model, tokenizer = load_base_model(cfg.model)
    return model, tokenizer, model.name_or_path


def open_run_hub(cfg: ExperimentConfig, run_dir: Path) -> Hub:
    """The hub of a run: a Hub endpoint if ``cfg.hub`` is set, else a LocalHub inside the run directory."""
    if cfg.hub:
        return HfHub(endpoint=cfg.hub, namespace=cfg.hub_namespace)
    return LocalHub(run_dir / "hub", namespace=cfg.hub_namespace)


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


def cluster_lists(graph: nx.Graph) -> list[list[int]]:
    """The clusters of a topology as sorted member lists, ordered by cluster id."""
    ids = sorted({graph.nodes[p]["cluster"] for p in graph.nodes})
    return [sorted(p for p in graph.nodes if graph.nodes[p]["cluster"] == c) for c in ids]


def layer_sparsities(update: SparseUpdate) -> list[float]:
    """Kept fraction per layer of a peer's masks, in sorted layer order (aligned across peers)."""
    return [float(m.float().mean()) for _, m in sorted(update.masks.items())]


class Runner:
    """Runs (or resumes) one experiment in ``run_dir``; see the module docstring."""

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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "config.json"
        if path.exists():
            stored = ExperimentConfig.from_file(path)
            if stored.fingerprint() != self.cfg.fingerprint():
                raise ValueError(
                    f"{self.run_dir} holds a run with other settings (config fingerprint {stored.fingerprint()} vs "
                    f"{self.cfg.fingerprint()}): use another --run-dir or delete it"
                )
        else:
            write_json(path, self.cfg.to_dict())

    def _load(self) -> None:
        self.base, self.tokenizer, self.base_id = self._base or load_model(self.cfg)
        self.base.to(resolve_device(self.cfg.device))
        self.base.config._name_or_path = self.base_id  # recorded by PEFT as every adapter's base model
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.tasks = self._tasks if self._tasks is not None else load_tasks(self.cfg)
        self.hub = self._hub or open_run_hub(self.cfg, self.run_dir)
        self.shards = task_shards(self.cfg, self.tasks)

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        """Run every method (resuming finished parts), then write results.json, results.md and the plots."""
        from .report import write_report

        self._prepare_dir()
        self._load()
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        results = {method: self.run_method(method) for method in self.cfg.methods}
        if "solora" in results and not (self.run_dir / "moe" / "config.json").exists():
            self.save_moe(results)
        summary = {
            "config": self.cfg.to_dict(),
            "base_model": self.base_id,
            "base_params": sum(p.numel() for p in self.base.parameters()),
            "methods": results,
        }
        write_json(self.run_dir / "results.json", summary)
        write_report(summary, self.run_dir)
        return summary

    def run_method(self, method: str) -> dict[str, Any]:
        """Train, exchange and evaluate one method; a finished method is read back from its ``final.json``."""
        mdir = self.run_dir / "methods" / method
        mdir.mkdir(parents=True, exist_ok=True)
        final_path = mdir / "final.json"
        if final_path.exists():
            return json.loads(final_path.read_text())
        spec = METHOD_SPECS[method]
        started = time.perf_counter()
        ws = Workspace(self.base, self.base_id, self.cfg, spec)
        try:
            result = self._run_method(spec, ws, mdir)
        finally:
            self.base = ws.release()
        result["seconds"] = time.perf_counter() - started
        write_json(final_path, result)
        return result

    def _run_method(self, spec: MethodSpec, ws: Workspace, mdir: Path) -> dict[str, Any]:
        cfg, n = self.cfg, self.cfg.peers
        payload_cls = DenseUpdate if spec.adapter == "lora" else SparseUpdate
        engine = make_engine(self, spec, ws, mdir)
        try:
            # A peer's state before its first round: SO-LoRA = masks + zero B; LoRA = its random A + zero B.
            setup = engine.map("setup", {p: () for p in range(n)}, desc=f"{spec.name}: set-up")
            structure = {p: payload_cls.from_bytes(setup[p]) for p in range(n)}
            graph = self._topology(spec, structure)
            plot_topology(graph, mdir / "topology.png", title=f"{spec.name}: {graph.graph.get('kind', spec.topology)}")
            cluster_of = {p: graph.nodes[p]["cluster"] for p in range(n)}
            members = {p: tuple(q for q in range(n) if cluster_of[q] == cluster_of[p]) for p in range(n)}
            weights = {p: float(len(self.shards[p])) for p in range(n)}
            plans = {
                p: PeerPlan(
                    neighbours=tuple(sorted(graph.neighbors(p))),
                    forward=members[p] if spec.forward == "cluster" else (p,),
                    weights=weights,
                    cluster=int(cluster_of[p]),
                )
                for p in range(n)
            }
            engine.map("configure", {p: (plans[p],) for p in range(n)}, desc=f"{spec.name}: plan")
            history = self._load_history(mdir)
            start = len(history)
            if start:
                engine.map("restore", {p: (start - 1,) for p in range(n)}, desc=f"{spec.name}: resume")
            rounds = tqdm(range(start, cfg.rounds), desc=spec.name, disable=not self.progress, initial=start,
                          total=cfg.rounds)  # fmt: skip
            for r in rounds:
                trained = engine.map("train_and_push", {p: (r,) for p in range(n)}, desc=f"round {r}: train+push")
                pulled = engine.map("pull_and_aggregate", {p: (r,) for p in range(n)}, desc=f"round {r}: pull")
                payloads = {p: UpdateStats(**trained[p]["stats"]) for p in range(n)}
                record = round_record(r, trained, pulled)
                record["comm"] = round_stats(graph, payloads, method=spec.name, seed=cfg.seed).as_dict()
                record["curve"] = self._evaluate(spec, self._views(mdir, spec, r), ws, graph, curve=True)
                write_json(mdir / f"round-{r:04d}.json", record)
                history.append(record)
                rounds.set_postfix(loss=f"{np.mean(list(record['train_loss'].values())):.3f}")
            rounds.close()
            self.router_choice = None
            final = self._evaluate(spec, self._views(mdir, spec, cfg.rounds - 1), ws, graph, curve=False)
            metrics = {f"accuracy/{t}": acc for t, acc in final.items()}
            engine.map("publish", {p: (metrics,) for p in range(n)}, desc=f"{spec.name}: publish")
        finally:
            engine.close()
        return {
            "method": spec.name,
            "accuracy": final,
            "average": float(np.mean(list(final.values()))),
            "curve": [h["curve"] for h in history],
            "train_loss": [float(np.mean(list(h["train_loss"].values()))) for h in history],
            "bytes_by_round": [int(h["comm"]["bytes_sent"]) for h in history],
            "clusters": cluster_lists(graph),
            "collision_rate": self._collision_rate(spec, graph, structure),
            "router": self.router_choice,
            "n_test": {t: len(task.test) for t, task in self.tasks.items()},
            **self._comm_totals(spec, history, structure),
        }

    def _views(self, mdir: Path, spec: MethodSpec, r: int) -> dict[int, dict[str, Any]]:
        """Every peer's view after round ``r``, read from the peers' own checkpoints."""
        return {p: load_view(checkpoint_path(mdir, p, r), spec) for p in range(self.cfg.peers)}

    def _load_history(self, mdir: Path) -> list[dict[str, Any]]:
        history = []
        while (mdir / f"round-{len(history):04d}.json").exists():
            history.append(json.loads((mdir / f"round-{len(history):04d}.json").read_text()))
        return history

    # ------------------------------------------------------------------ topology
    def _topology(self, spec: MethodSpec, structure: Mapping[int, Any]) -> nx.Graph:
        n, cfg = self.cfg.peers, self.cfg
        positions = place_peers(n, seed=cfg.seed)
        if spec.topology == "random":
            return random_topology(n, degree=min(cfg.degree, n - 1), seed=cfg.seed, positions=positions)
        if spec.topology == "single":
            return single_cluster(n, positions=positions)
        if spec.topology == "cluster":
            sparsities = [layer_sparsities(structure[p]) for p in range(n)]
            sizes = [m.numel() for _, m in sorted(structure[0].masks.items())]
            payload_bits = 8 * max(update_stats(structure[p]).value_bytes for p in range(n))
            return cluster_topology(positions, sparsities, s_max=cfg.s_max, payload_bits=payload_bits, seed=cfg.seed,
                                    layer_weights=sizes)  # fmt: skip
        # "none" (local: every peer alone) or "task" (oracle: one cluster per task)
        graph = nx.Graph(kind=spec.topology)
        task_ids = {t: i for i, t in enumerate(cfg.tasks)}
        for p in range(n):
            cluster = p if spec.topology == "none" else task_ids[cfg.task_of(p)]
            graph.add_node(p, cluster=cluster, pos=(float(positions[p, 0]), float(positions[p, 1])))
        if spec.topology == "task":
            graph.add_edges_from((p, q) for p in range(n) for q in range(p + 1, n) if cfg.task_of(p) == cfg.task_of(q))
        return graph

    def _collision_rate(self, spec: MethodSpec, graph: nx.Graph, structure: Mapping[int, Any]) -> float | None:
        """Mean collision rate of the groups that average B together (clusters, or a peer and its neighbours)."""
        if spec.adapter == "lora":
            return None
        if spec.forward == "own":
            groups = [[p, *graph.neighbors(p)] for p in graph.nodes]
        else:
            clusters = {graph.nodes[p]["cluster"] for p in graph.nodes}
            groups = [[q for q in graph.nodes if graph.nodes[q]["cluster"] == c] for c in clusters]
        sizes = [m.numel() for _, m in sorted(structure[0].masks.items())]
        rates = []
        for members in groups:
            s = [layer_sparsities(structure[p]) for p in members]
            rates.append(cluster_collision_rate(s, layer_weights=sizes))
        return float(np.mean(rates))

    # ------------------------------------------------------------------ accounting
    def _comm_totals(self, spec: MethodSpec, history: list[dict], structure: Mapping[int, Any]) -> dict[str, Any]:
        n = self.cfg.peers
        updated = int(np.mean([structure[p].num_values for p in range(n)]))  # SO-LoRA: masked entries; LoRA: A+B
        comm = [h["comm"] for h in history]
        links = max((c["num_links"] for c in comm), default=0)
        params_sent = sum(c["params_sent"] for c in comm)
        return {
            "params_updated": updated,
            "params_transmitted_per_round": params_sent / len(comm) / links if links else 0.0,
            "bytes_transmitted": int(sum(c["bytes_sent"] for c in comm)),
            "delay_s": float(sum(c["delay_s"] for c in comm)),
            "energy_j": float(sum(c["energy_j"] for c in comm)),
            "links_per_round": links,
        }

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, spec: MethodSpec, views, ws: Workspace, graph: nx.Graph, *, curve: bool) -> dict[str, float]:
        """Accuracy per task: the mean over peers' models (each distinct model evaluated once).

        For the per-round curve only peer 0's model (and ``n_curve`` questions per task) is evaluated.
        """
        tasks = self.tasks
        if curve:
            tasks = {t: dataclasses.replace(task, test=task.test[: self.cfg.n_curve]) for t, task in tasks.items()}
        kw = dict(batch_size=self.cfg.eval_batch_size, max_len=self.cfg.max_len)
        if spec.final == "moe":
            moe = self._moe(ws, cluster_lists(graph), views)
            if not curve and self.cfg.n_validation > 0:
                validation = {
                    t: dataclasses.replace(task, test=task.validation, validation=[]) for t, task in self.tasks.items()
                }
                self.router_choice = choose_router(moe, validation, self.tokenizer, rank=self.cfg.rank, **kw)
            return evaluate_moe(moe, tasks, self.tokenizer, progress=self.progress and not curve, **kw)
        if spec.final == "oracle":  # each task with the cluster of the peers that hold it (true task id)
            out = {}
            for t, task in tasks.items():
                holder = next(p for p in range(self.cfg.peers) if self.cfg.task_of(p) == t)
                out[t] = self._evaluate_view(ws, views[holder], {t: task}, **kw)[t]
            return out
        distinct = [0] if curve or spec.final == "cluster" else list(range(self.cfg.peers))
        per_task: dict[str, list[float]] = {t: [] for t in tasks}
        bar = tqdm(distinct, desc=f"{spec.name}: evaluate", disable=not self.progress or curve, leave=False)
        for p in bar:
            for t, acc in self._evaluate_view(ws, views[p], tasks, **kw).items():
                per_task[t].append(acc)
        return {t: float(np.mean(v)) for t, v in per_task.items()}

    def _evaluate_view(self, ws: Workspace, view, tasks: Mapping[str, Task], **kw: Any) -> dict[str, float]:
        ws.load_view(view)
        ws.activate(list(view))
        return {t: evaluate(ws.network, self.tokenizer, task, **kw)["accuracy"] for t, task in tasks.items()}

    def _experts(self, clusters: list[list[int]], views) -> list[list[SparseUpdate]]:
        """Inter-cluster exchange: one expert per cluster (its members' parts), never averaged across clusters."""
        return [[views[members[0]][adapter_name(q)] for q in members] for members in clusters]

    def _moe(self, ws: Workspace, clusters: list[list[int]], views, **router: Any) -> Any:
        """The implicit MoE of the clusters' experts with the configured (or given) router settings."""
        settings = {"router_top_k": self.cfg.router_top_k, "refine": self.cfg.router_refine, **router}
        return build_moe(ws, self._experts(clusters, views), calibration=self._moe_calibration(clusters), **settings)

    def _moe_calibration(self, clusters: list[list[int]]) -> list[list[dict[str, torch.Tensor]]]:
        """Per expert, per member: the member's calibration batch (its task's input statistics, Eq. 26)."""
        return [
            [peer_batches(self.cfg, self.shards[p], self.tokenizer, p, CALIBRATION)[0] for p in members]
            for members in clusters
        ]

    # ------------------------------------------------------------------ the merged model
    def save_moe(self, results: Mapping[str, Any]) -> Path:
        """Save the ``solora`` run's implicit MoE (one expert per cluster) with its card, and commit it to the hub.

        The card carries the run's results table (``model-index``) and communication totals; the base model is
        referenced by id, not uploaded.
        """
        spec = METHOD_SPECS["solora"]
        clusters = results["solora"]["clusters"]
        views = self._views(self.run_dir / "methods" / "solora", spec, self.cfg.rounds - 1)
        ws = Workspace(self.base, self.base_id, self.cfg, spec)
        try:
            for members in clusters:
                ws.load_view(views[members[0]])
            chosen = results["solora"].get("router") or {}
            moe = self._moe(ws, clusters, views, **{k: chosen[k] for k in ("router_top_k", "refine") if k in chosen})
        finally:
            self.base = ws.release()
        repo_id = self.hub.repo_id("solora-moe")
        card = MoECardInfo(
            repo_id=repo_id,
            base_model=self.base_id,
            experts=[
                ExpertInfo(cluster=c, peers=[adapter_name(p) for p in m], tasks=[self.cfg.task_of(p) for p in m])
                for c, m in enumerate(clusters)
            ],
            router_top_k=moe.config.router_top_k,
            refinement=moe.config.refine,
            results={t: {m: r["accuracy"][t] for m, r in results.items()} for t in self.cfg.tasks},
            method="solora",
            test_size=results["solora"]["n_test"],
            communication={
                m: {"bytes transmitted": r["bytes_transmitted"], "params updated per peer": r["params_updated"]}
                for m, r in results.items()
            },
        )
        out = self.run_dir / "moe"
        moe.save_pretrained(out, card_info=card)
        self.hub.create_repo(repo_id, exist_ok=True)
        files = {f.name: f for f in sorted(out.iterdir()) if f.is_file()}
        self.hub.create_commit(repo_id, files, commit_message="implicit MoE of the run's clusters")
        return out


def run_experiment(cfg: ExperimentConfig, run_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume) the experiment described by ``cfg`` in ``run_dir``; returns the results summary."""
    return Runner(cfg, run_dir, **kwargs).run()
