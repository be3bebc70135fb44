"""The decentralized experiment: N peers, one task each, fine-tune one base model together through a hub.

For every method (experiment/methods.py) the runner creates each peer's adapter, calibrates SO-LoRA masks on the
peer's own data, builds the method's topology, then runs ``rounds`` rounds of: local training (a fresh AdamW, the
same batches for every method) -> push one revision per peer to the hub -> pull the neighbours' revisions of that
round (pinned to their ``round-N`` tags) -> aggregate. The hub is the only channel between peers. Finally each
peer's model is evaluated on every task's test split. A run directory makes the run resumable: every finished
round is checkpointed (peers' views as safetensors), every finished method's evaluation is stored, and the hub keeps
the pushed revisions, so a killed run continues where it stopped and yields the same table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from gossip import Hub, LocalHub, Peer
from gossip.accounting import dense_payload_stats, round_stats
from gossip.aggregation import fedavg, masked_average, member_views
from gossip.dense import DenseUpdate
from gossip.hub import HfHub
from gossip.plot import plot_topology
from gossip.topology import cluster_collision_rate, cluster_topology, random_topology, single_cluster
from gossip.wireless import place_peers
from peft_sorlora import SparseUpdate, update_stats
from peft_sorlora.projection import derive_seed

from .config import ExperimentConfig
from .evaluation import evaluate
from .final_models import evaluate_moe
from .methods import METHOD_SPECS, MethodSpec
from .model_loading import load_base_model, tiny_random_model
from .tasks import Task, collate_for_training, encode_for_training, load_task, synthetic_task
from .workspace import Workspace, adapter_name

__all__ = ["Runner", "run_experiment", "load_tasks"]

logger = logging.getLogger(__name__)

CRASH_ENV = "SORLORA_CRASH_AT"  # e.g. "solora:1:peer02": the process dies (os._exit) right after that push


def _crash_point(tag: str) -> None:
    """Simulate a hard kill at a named point (tests of resumption set ``SORLORA_CRASH_AT``)."""
    if os.environ.get(CRASH_ENV) == tag:
        logger.error("simulated crash at %s", tag)
        os._exit(137)


def load_tasks(cfg: ExperimentConfig) -> dict[str, Task]:
    """The run's tasks with fixed splits; names starting with ``synthetic-`` are generated (tests)."""
    tasks = {}
    for name in cfg.tasks:
        if name.startswith("synthetic-"):
            tasks[name] = synthetic_task(name, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed)
        else:
            tasks[name] = load_task(name, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed)
    return tasks


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
            path.write_text(json.dumps(self.cfg.to_dict(), indent=1))

    def _load(self) -> None:
        if self._base is None:
            if self.cfg.model == "tiny-random":
                model, tokenizer = tiny_random_model(seed=self.cfg.seed)
                self._base = (model, tokenizer, "tiny-random-llama")
            else:
                self._base = load_base_model(self.cfg.model)
        self.base, self.tokenizer, self.base_id = self._base
        self.base.config._name_or_path = self.base_id  # recorded by PEFT as every adapter's base_model_name_or_path
        for p in self.base.parameters():
            p.requires_grad_(False)
        if self._tasks is None:
            self._tasks = load_tasks(self.cfg)
        self.tasks = self._tasks
        if self._hub is None:
            self._hub = (
                HfHub(endpoint=self.cfg.hub, namespace=self.cfg.hub_namespace)
                if self.cfg.hub
                else LocalHub(self.run_dir / "hub", namespace=self.cfg.hub_namespace)
            )
        self.hub = self._hub
        shards: dict[int, list] = {}
        for task in self.tasks.values():
            holders = [p for p in range(self.cfg.peers) if self.cfg.task_of(p) == task.name]
            for k, peer in enumerate(holders):
                shards[peer] = task.train[k :: len(holders)]
        self.shards = shards
        empty = [p for p, s in shards.items() if not s]
        if empty:
            raise ValueError(f"peers {empty} have no training data: raise n_train or lower peers")

    def batches(self, peer: int, round: int) -> list[dict[str, torch.Tensor]]:
        """The ``local_steps`` batches of ``peer`` in ``round``: a pure function of (seed, peer, round, step)."""
        shard = self.shards[peer]
        out = []
        for step in range(self.cfg.local_steps):
            g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "batch", peer, round, step) % 2**63)
            idx = torch.randint(len(shard), (self.cfg.batch_size,), generator=g).tolist()
            encoded = [encode_for_training(shard[i], self.tokenizer, max_len=self.cfg.max_len) for i in idx]
            out.append(collate_for_training(encoded, pad_token_id=self.tokenizer.pad_token_id))
        return out

    def calibration_batch(self, peer: int) -> dict[str, torch.Tensor]:
        """The batch a peer calibrates its masks on (its own data, a fixed draw)."""
        return self.batches(peer, round=-1)[0]

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        """Run every method (resuming finished parts), then write results.json, results.md and the plots."""
        from .report import write_report

        self._prepare_dir()
        self._load()
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        results = {}
        for method in self.cfg.methods:
            results[method] = self.run_method(method)
        summary = {
            "config": self.cfg.to_dict(),
            "base_model": self.base_id,
            "base_params": sum(p.numel() for p in self.base.parameters()),
            "methods": results,
        }
        (self.run_dir / "results.json").write_text(json.dumps(summary, indent=1))
        write_report(summary, self.run_dir)
        return summary

    def _method_dir(self, method: str) -> Path:
        path = self.run_dir / "methods" / method
        path.mkdir(parents=True, exist_ok=True)
        return path

    def run_method(self, method: str) -> dict[str, Any]:
        """Train, exchange and evaluate one method; a finished method is read back from its ``final.json``."""
        mdir = self._method_dir(method)
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
        final_path.write_text(json.dumps(result, indent=1))
        return result

    def _peers(self, spec: MethodSpec, structure: Mapping[int, Any]) -> dict[int, Peer]:
        payload_cls = DenseUpdate if spec.adapter == "lora" else SparseUpdate
        peers = {}
        for p in range(self.cfg.peers):
            peers[p] = Peer(
                self.hub,
                f"{spec.name}-{adapter_name(p)}",
                task=self.cfg.task_of(p),
                base_model=self.base_id,
                config_hash=structure[p].config_hash,
                payload_cls=payload_cls,
            )
        return peers

    def _topology(self, spec: MethodSpec, structure: Mapping[int, Any]):
        n, cfg = self.cfg.peers, self.cfg
        positions = place_peers(n, seed=cfg.seed)
        if spec.topology == "random":
            graph = random_topology(n, degree=min(cfg.degree, n - 1), seed=cfg.seed, positions=positions)
        elif spec.topology == "single":
            graph = single_cluster(n, positions=positions)
        elif spec.topology == "cluster":
            sparsities = [[float(m.float().mean()) for m in structure[p].masks.values()] for p in range(n)]
            weights = [m.numel() for m in structure[0].masks.values()]
            payload_bits = 8 * max(update_stats(structure[p]).value_bytes for p in range(n))
            graph = cluster_topology(positions, sparsities, s_max=cfg.s_max, payload_bits=payload_bits,
                                     seed=cfg.seed, layer_weights=weights)  # fmt: skip
        else:  # "none" (local) or "task" (oracle): clusters of peers that share a task
            import networkx as nx

            graph = nx.Graph(kind=spec.topology)
            task_ids = {t: i for i, t in enumerate(cfg.tasks)}
            for p in range(n):
                cluster = p if spec.topology == "none" else task_ids[cfg.task_of(p)]
                graph.add_node(p, cluster=cluster, pos=tuple(float(x) for x in positions[p]))
            if spec.topology == "task":
                for p in range(n):
                    for q in range(p + 1, n):
                        if cfg.task_of(p) == cfg.task_of(q):
                            graph.add_edge(p, q)
        return graph

    def _collision_rate(self, spec: MethodSpec, graph, structure: Mapping[int, Any]) -> float | None:
        """Mean collision rate of the groups that average B together (clusters, or a peer and its neighbours)."""
        if spec.adapter == "lora":
            return None
        groups = (
            [[p, *graph.neighbors(p)] for p in graph.nodes]
            if spec.forward == "own"
            else [
                [q for q in graph.nodes if graph.nodes[q]["cluster"] == c]
                for c in {graph.nodes[p]["cluster"] for p in graph.nodes}
            ]
        )
        weights = [m.numel() for m in structure[0].masks.values()]
        rates = []
        for members in groups:
            s = [[float(m.float().mean()) for m in structure[p].masks.values()] for p in members]
            rates.append(cluster_collision_rate(s, layer_weights=weights))
        return float(np.mean(rates))

    def _run_method(self, spec: MethodSpec, ws: Workspace, mdir: Path) -> dict[str, Any]:
        cfg, n = self.cfg, self.cfg.peers
        bar = tqdm(total=n, desc=f"{spec.name}: set-up", disable=not self.progress, leave=False)
        for p in range(n):
            ws.add_peer(p)
            if spec.adapter == "solora":
                ws.calibrate(p, [self.calibration_batch(p)])
            bar.update()
        bar.close()
        # A peer's state before its first round: SO-LoRA = masks + zero B; LoRA = its random A + zero B.
        structure = {p: ws.own_state(p, round=0) for p in range(n)}
        graph = self._topology(spec, structure)
        plot_topology(graph, mdir / "topology.png", title=f"{spec.name}: {graph.graph.get('kind', spec.topology)}")
        cluster_of = {p: graph.nodes[p]["cluster"] for p in range(n)}
        members = {p: sorted(q for q in range(n) if cluster_of[q] == cluster_of[p]) for p in range(n)}
        forward = {p: members[p] if spec.forward == "cluster" else [p] for p in range(n)}
        neighbours = {p: sorted(graph.neighbors(p)) for p in range(n)}
        weights = {p: float(len(self.shards[p])) for p in range(n)}
        views = {p: {adapter_name(q): structure[q] for q in forward[p]} for p in range(n)}
        peers = self._peers(spec, structure)
        history = self._load_history(mdir)
        start = len(history)
        if start:
            views = self._load_views(mdir, start - 1, structure, spec)
        rounds_bar = tqdm(range(start, cfg.rounds), desc=spec.name, disable=not self.progress, initial=start,
                          total=cfg.rounds)  # fmt: skip
        for r in rounds_bar:
            own, losses, pushed_bytes = {}, {}, {}
            for p in tqdm(range(n), desc=f"round {r}: train+push", disable=not self.progress, leave=False):
                ws.load_view(views[p])
                losses[p] = ws.train(p, [adapter_name(q) for q in forward[p]], self.batches(p, r), lr=cfg.lr[spec.name])
                update = ws.own_state(p, round=r)
                if spec.adapter == "solora" and r == 0:
                    update = dataclasses.replace(update, masks=structure[p].masks, shapes=structure[p].shapes)
                elif spec.adapter == "solora":
                    update = dataclasses.replace(update, masks=None, shapes=None)
                own[p] = update
                pushed = peers[p].push_round(r, update, metrics={"train_loss": float(np.mean(losses[p]))})
                pushed_bytes[p] = pushed.bytes
                _crash_point(f"{spec.name}:{r}:{adapter_name(p)}")
            pulls = {}
            for p in tqdm(range(n), desc=f"round {r}: pull+aggregate", disable=not self.progress, leave=False):
                pull = peers[p].pull_round(r, [f"{spec.name}-{adapter_name(q)}" for q in neighbours[p]], timeout=60.0)
                received = {int(k.rsplit("peer", 1)[1]): u for k, u in pull.updates.items()}
                pulls[p] = {"skipped": sorted(pull.skipped), "rejected": {k: str(v) for k, v in pull.rejected.items()}}
                views[p] = self._aggregate(spec, p, own[p], received, views[p], structure, weights, forward[p])
            stats = self._round_stats(spec, graph, own)
            curve = self._evaluate(spec, views, ws, graph, structure, curve=True)
            record = {
                "round": r,
                "train_loss": {str(p): float(np.mean(v)) for p, v in losses.items()},
                "bytes_pushed": {str(p): b for p, b in pushed_bytes.items()},
                "pulls": {str(p): v for p, v in pulls.items()},
                "comm": stats.as_dict(),
                "curve": curve,
            }
            self._save_round(mdir, r, views, record)
            history.append(record)
            rounds_bar.set_postfix(loss=f"{np.mean([np.mean(v) for v in losses.values()]):.3f}")
        rounds_bar.close()
        final = self._evaluate(spec, views, ws, graph, structure, curve=False)
        comm = self._comm_totals(spec, graph, history, structure)
        return {
            "method": spec.name,
            "accuracy": final,
            "average": float(np.mean(list(final.values()))),
            "curve": [h["curve"] for h in history],
            "train_loss": [float(np.mean(list(h["train_loss"].values()))) for h in history],
            "bytes_by_round": [int(h["comm"]["bytes_sent"]) for h in history],
            "clusters": sorted(sorted(m) for m in {tuple(v) for v in members.values()}),
            "collision_rate": self._collision_rate(spec, graph, structure),
            "n_test": {t: len(task.test) for t, task in self.tasks.items()},
            **comm,
        }

    # ------------------------------------------------------------------ aggregation
    def _aggregate(self, spec, p, own, received, view, structure, weights, forward) -> dict[str, Any]:
        """Peer ``p``'s new view from its own trained update and its neighbours' (method.md §3)."""
        if spec.aggregation == "none":
            return {adapter_name(p): own}
        if spec.aggregation == "fedavg":
            group = {p: own, **received}
            avg = fedavg([u.values for u in group.values()], [weights[q] for q in group])
            return {adapter_name(p): dataclasses.replace(own, values=avg)}
        # masked averaging of B over the members that hold each entry (weights = data size)
        group = {p: own, **received}
        order = sorted(group)
        masks = [structure[q].masks for q in order]
        b_bar = masked_average([group[q].values for q in order], masks, [weights[q] for q in order])
        if spec.forward == "own":
            (mine,) = member_views(b_bar, [own], structure=[structure[p]])
            return {adapter_name(p): dataclasses.replace(mine, masks=None, shapes=None)}
        present = [q for q in forward if q in group]
        parts = member_views(b_bar, [group[q] for q in present], structure=[structure[q] for q in present])
        new_view = dict(view)  # members that were skipped keep their previous values
        for q, part in zip(present, parts):
            new_view[adapter_name(q)] = dataclasses.replace(part, masks=None, shapes=None)
        return new_view

    # ------------------------------------------------------------------ accounting
    def _round_stats(self, spec, graph, own):
        payloads = {
            p: (dense_payload_stats(u.values) if spec.adapter == "lora" else update_stats(u)) for p, u in own.items()
        }
        return round_stats(graph, payloads, method=spec.name, seed=self.cfg.seed)

    def _comm_totals(self, spec, graph, history, structure) -> dict[str, Any]:
        n = self.cfg.peers
        if spec.adapter == "lora":
            updated = sum(int(v.numel()) for v in structure[0].values.values())
        else:
            updated = int(np.mean([structure[p].num_values for p in range(n)]))
        comm = [h["comm"] for h in history]
        bytes_sent = sum(c["bytes_sent"] for c in comm)
        params_sent = sum(c["params_sent"] for c in comm)
        links = max((c["num_links"] for c in comm), default=0)
        return {
            "params_updated": updated,
            "params_transmitted_per_round": (params_sent / max(len(comm), 1) / max(links, 1)) if links else 0.0,
            "bytes_transmitted": int(bytes_sent),
            "delay_s": float(sum(c["delay_s"] for c in comm)),
            "energy_j": float(sum(c["energy_j"] for c in comm)),
            "links_per_round": links,
        }

    # ------------------------------------------------------------------ evaluation
    def _eval_tasks(self, curve: bool) -> dict[str, Task]:
        if not curve:
            return self.tasks
        return {t: dataclasses.replace(task, test=task.test[: self.cfg.n_curve]) for t, task in self.tasks.items()}

    def _evaluate(self, spec, views, ws: Workspace, graph, structure, *, curve: bool) -> dict[str, float]:
        """Accuracy per task: the mean over peers' models (each distinct model evaluated once).

        For the per-round curve only peer 0's model (and ``n_curve`` questions per task) is evaluated.
        """
        tasks = self._eval_tasks(curve)
        n = self.cfg.peers
        kw = dict(batch_size=self.cfg.eval_batch_size, max_len=self.cfg.max_len)
        desc = f"{spec.name}: {'curve' if curve else 'evaluate'}"
        if spec.final == "moe":
            experts = self._experts(graph, views, structure)
            return evaluate_moe(self.base, ws, experts, tasks, self.tokenizer, calibration=self._moe_calibration(graph),
                                router_top_k=self.cfg.router_top_k, progress=self.progress and not curve, **kw)  # fmt: skip
        if spec.final == "oracle":
            out = {}
            for t, task in tasks.items():
                holder = next(p for p in range(n) if self.cfg.task_of(p) == t)
                ws.load_view(views[holder])
                ws.activate(list(views[holder]))
                out[t] = evaluate(ws.network, self.tokenizer, task, **kw)["accuracy"]
            return out
        if spec.final == "cluster":
            distinct = [0]
        else:
            distinct = [0] if curve else list(range(n))
        per_task: dict[str, list[float]] = {t: [] for t in tasks}
        for p in tqdm(distinct, desc=desc, disable=not self.progress or curve, leave=False):
            ws.load_view(views[p])
            ws.activate(list(views[p]))
            for t, task in tasks.items():
                per_task[t].append(evaluate(ws.network, self.tokenizer, task, **kw)["accuracy"])
        return {t: float(np.mean(v)) for t, v in per_task.items()}

    def _experts(self, graph, views, structure) -> list[list[SparseUpdate]]:
        """Inter-cluster exchange: one expert per cluster (its members' parts), never averaged across clusters."""
        experts = []
        for c in sorted({graph.nodes[p]["cluster"] for p in graph.nodes}):
            first = min(p for p in graph.nodes if graph.nodes[p]["cluster"] == c)
            parts = []
            for name in sorted(views[first]):
                q = int(name.rsplit("peer", 1)[1])
                parts.append(
                    dataclasses.replace(views[first][name], masks=structure[q].masks, shapes=structure[q].shapes)
                )
            experts.append(parts)
        return experts

    def _moe_calibration(self, graph) -> list[list[dict[str, torch.Tensor]]]:
        """Per expert, per member: the member's calibration batch (its task's input statistics, Eq. 26)."""
        out = []
        for c in sorted({graph.nodes[p]["cluster"] for p in graph.nodes}):
            out.append(
                [self.calibration_batch(p) for p in sorted(q for q in graph.nodes if graph.nodes[q]["cluster"] == c)]
            )
        return out

    # ------------------------------------------------------------------ checkpoints
    def _save_round(self, mdir: Path, r: int, views, record) -> None:
        tensors, index = {}, {}
        for p, view in views.items():
            for name, state in view.items():
                for key, value in state.values.items():
                    tensors[f"{p}/{name}/{key}"] = value.contiguous()
                index.setdefault(str(p), {})[name] = dict(state.metadata)
        tmp = mdir / f"round-{r:04d}.safetensors.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, mdir / f"round-{r:04d}.safetensors")
        record = dict(record, views=index)
        tmp_json = mdir / f"round-{r:04d}.json.tmp"
        tmp_json.write_text(json.dumps(record, indent=1))
        os.replace(tmp_json, mdir / f"round-{r:04d}.json")

    def _load_history(self, mdir: Path) -> list[dict[str, Any]]:
        history = []
        r = 0
        while (mdir / f"round-{r:04d}.json").exists() and (mdir / f"round-{r:04d}.safetensors").exists():
            history.append(json.loads((mdir / f"round-{r:04d}.json").read_text()))
            r += 1
        return history

    def _load_views(self, mdir: Path, r: int, structure, spec: MethodSpec):
        tensors = load_file(str(mdir / f"round-{r:04d}.safetensors"))
        index = json.loads((mdir / f"round-{r:04d}.json").read_text())["views"]
        views: dict[int, dict[str, Any]] = {}
        for p, names in index.items():
            views[int(p)] = {}
            for name, metadata in names.items():
                prefix = f"{p}/{name}/"
                values = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                cls = DenseUpdate if spec.adapter == "lora" else SparseUpdate
                views[int(p)][name] = cls(values=values, metadata=metadata)
        return views


def run_experiment(cfg: ExperimentConfig, run_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume) the experiment described by ``cfg`` in ``run_dir``; returns the results summary."""
    return Runner(cfg, run_dir, **kwargs).run()
