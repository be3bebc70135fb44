"""One peer of one method: trains its adapter, pushes one hub revision per round, pulls and aggregates.

A :class:`PeerWorker` is the unit an engine runs: the local engine keeps all workers in one process around a shared
workspace; the Ray engine wraps each in an actor with a workspace of its own. Workers talk to each other only
through the hub, and each checkpoints its own view after every round under the run directory, so a crashed peer
resumes from its last round.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from peft_sorlora import SparseUpdate, update_stats
from peft_sorlora.projection import derive_seed
from sorlora_gossip import Hub, Peer
from sorlora_gossip.accounting import dense_payload_stats
from sorlora_gossip.aggregation import fedavg, masked_average, member_views
from sorlora_gossip.dense import DenseUpdate
from sorlora_gossip.hub import RevisionNotFound
from sorlora_gossip.peer import UPDATE_FILE

from .config import ExperimentConfig
from .methods import MethodSpec
from .tasks import Example, collate_for_training, encode_for_training
from .workspace import Workspace, adapter_name, peer_of

__all__ = [
    "CALIBRATION",
    "CRASH_ENV",
    "PeerPlan",
    "PeerWorker",
    "checkpoint_path",
    "load_view",
    "peer_batches",
    "peer_id",
    "peer_index",
    "round_record",
    "save_view",
    "write_json",
]

CRASH_ENV = "SORLORA_CRASH_AT"  # e.g. "solora:1:peer02": the process dies (os._exit) right after that push


def _crash_point(tag: str) -> None:
    """Simulate a hard kill at a named point (tests of resumption set ``SORLORA_CRASH_AT``)."""
    if os.environ.get(CRASH_ENV) == tag:
        os._exit(137)


def peer_id(method: str, peer: int) -> str:
    """The hub identity (repo name) of ``peer`` in ``method``."""
    return f"{method}-{adapter_name(peer)}"


def peer_index(pid: str) -> int:
    """The peer number in a hub identity made by :func:`peer_id`."""
    return peer_of(pid.rsplit("-", 1)[1])


def checkpoint_path(method_dir: Path, peer: int, round: int) -> Path:
    """Where ``peer`` stores its view after ``round``."""
    return method_dir / "peers" / adapter_name(peer) / f"round-{round:04d}.safetensors"


def _payload_cls(spec: MethodSpec) -> type:
    return DenseUpdate if spec.adapter == "lora" else SparseUpdate


def save_view(path: Path, view: Mapping[str, Any]) -> None:
    """Store a view atomically: each adapter's payload bytes (with structure) as a uint8 tensor in one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: torch.frombuffer(bytearray(state.to_bytes()), dtype=torch.uint8) for name, state in view.items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def load_view(path: Path, spec: MethodSpec) -> dict[str, Any]:
    """Read a view stored by :func:`save_view`; every payload is validated again on the way in."""
    cls = _payload_cls(spec)
    return {name: cls.from_bytes(bytes(t.numpy())) for name, t in sorted(load_file(str(path)).items())}


CALIBRATION = -1  # the "round" whose first batch a peer calibrates its masks on


def peer_batches(
    cfg: ExperimentConfig, shard: Sequence[Example], tokenizer: Any, peer: int, round: int
) -> list[dict[str, torch.Tensor]]:
    """The ``local_steps`` batches of ``peer`` in ``round``: a pure function of (seed, peer, round, step), the same
    for every method, so methods are compared on the same data and a resumed run repeats it exactly."""
    out = []
    for step in range(cfg.local_steps):
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "batch", peer, round, step) % 2**63)
        idx = torch.randint(len(shard), (cfg.batch_size,), generator=g).tolist()
        encoded = [encode_for_training(shard[i], tokenizer, max_len=cfg.max_len) for i in idx]
        out.append(collate_for_training(encoded, pad_token_id=tokenizer.pad_token_id))
    return out


@dataclass(frozen=True)
class PeerPlan:
    """What the driver tells a peer once the topology is known."""

    neighbours: tuple[int, ...]  # whose revisions this peer pulls every round
    forward: tuple[int, ...]  # whose adapters are active in this peer's forward pass (itself included)
    weights: dict[int, float] = field(default_factory=dict)  # data size per peer (aggregation weights)
    cluster: int = 0


class PeerWorker:
    """Peer ``peer`` of method ``spec`` (see module docstring)."""

    def __init__(
        self,
        *,
        cfg: ExperimentConfig,
        spec: MethodSpec,
        peer: int,
        workspace: Workspace,
        hub: Hub,
        shard: Sequence[Example],
        tokenizer: Any,
        method_dir: str | Path,
    ) -> None:
        self.cfg, self.spec, self.peer = cfg, spec, peer
        self.ws, self.shard, self.tokenizer = workspace, list(shard), tokenizer
        self.method_dir = Path(method_dir)
        self.name = adapter_name(peer)
        self.hub = hub
        self.hub_peer = self._hub_peer(None)
        self.structure: dict[int, Any] = {}
        self.view: dict[str, Any] = {}
        self.plan: PeerPlan | None = None

    def _hub_peer(self, adapter_config: Mapping[str, Any] | None) -> Peer:
        """This peer on the hub; with the SO-LoRA config every revision also carries the adapter card."""
        return Peer(
            self.hub, peer_id(self.spec.name, self.peer), task=self.cfg.task_of(self.peer),
            base_model=self.ws.base_model_id, payload_cls=_payload_cls(self.spec), adapter_config=adapter_config,
        )  # fmt: skip

    def batches(self, round: int) -> list[dict[str, torch.Tensor]]:
        return peer_batches(self.cfg, self.shard, self.tokenizer, self.peer, round)

    # ------------------------------------------------------------------ set-up
    def setup(self) -> bytes:
        """Create and calibrate this peer's adapter; return its initial state (with structure) as payload bytes."""
        if self.name not in (self.ws.model.peft_config if self.ws.model is not None else {}):
            self.ws.add_peer(self.peer)
        if self.spec.adapter == "solora":
            self.ws.calibrate(
                self.peer, [peer_batches(self.cfg, self.shard, self.tokenizer, self.peer, CALIBRATION)[0]]
            )
        own = self.ws.own_state(self.peer, round=0)
        self.structure[self.peer] = own
        self.view = {self.name: own}
        if self.spec.adapter == "solora":  # the dense LoRA baseline's repos carry no SO-LoRA card
            self.hub_peer = self._hub_peer(self.ws.model.peft_config[self.name].to_dict())
        self.hub_peer.config_hash = own.config_hash
        return own.to_bytes()

    def publish(self, metrics: Mapping[str, float] | None = None) -> str | None:
        """Commit this peer's final adapter in PEFT format (tag ``final``) so its card's snippet loads it.

        Idempotent: an existing ``final`` tag is kept. The dense LoRA baseline publishes nothing.
        """
        if self.spec.adapter != "solora":
            return None
        try:
            return self.hub.resolve(self.hub_peer.repo_id, "final")
        except RevisionNotFound:
            pass
        self.ws.load_view({self.name: self.view[self.name]})
        with tempfile.TemporaryDirectory() as tmp:
            self.ws.model.save_pretrained(tmp, selected_adapters=[self.name])
            folder = Path(tmp) / self.name if (Path(tmp) / self.name).is_dir() else Path(tmp)
            files = {f.name: f.read_bytes() for f in folder.iterdir() if f.suffix in (".json", ".safetensors")}
        return self.hub_peer.publish_adapter(files, metrics=metrics)

    def configure(self, plan: PeerPlan) -> None:
        self.plan = plan

    def restore(self, round: int) -> None:
        """Resume after ``round``: reload this peer's view and its neighbours' structure (their round-0 revisions)."""
        self.view = load_view(checkpoint_path(self.method_dir, self.peer, round), self.spec)
        self.hub_peer.last_pushed_round()
        if self.plan.neighbours:
            pull = self.hub_peer.pull_round(0, [peer_id(self.spec.name, q) for q in self.plan.neighbours], timeout=5.0)
            for pid, update in pull.updates.items():
                self.structure[peer_index(pid)] = update

    # ------------------------------------------------------------------ a round
    def train_and_push(self, round: int) -> dict[str, Any]:
        """Train on this round's batches from the current view, then push the own update as revision ``round``."""
        self.ws.load_view(self.view)
        active = [n for n in (adapter_name(q) for q in self.plan.forward) if n in self.view]
        losses = self.ws.train(self.peer, active, self.batches(round), lr=self.cfg.lr[self.spec.name])
        update = self.ws.own_state(self.peer, round=round)
        if self.spec.adapter == "solora" and round > 0:
            update = SparseUpdate(values=update.values, metadata=update.metadata)  # values only after round 0
        pushed = self.hub_peer.push_round(round, update, metrics={"train_loss": float(np.mean(losses))})
        if not pushed.created:  # resumed after a crash: the revision already on the hub is what neighbours use
            data = self.hub_peer.hub.read_bytes(self.hub_peer.repo_id, UPDATE_FILE, revision=pushed.sha)
            masks = None if round == 0 or self.spec.adapter == "lora" else self.structure[self.peer].masks
            update = _payload_cls(self.spec).from_bytes(data, masks=masks)
        self._own = update
        _crash_point(f"{self.spec.name}:{round}:{self.name}")
        stats = dense_payload_stats(update.values) if self.spec.adapter == "lora" else update_stats(update)
        return {
            "loss": float(np.mean(losses)),
            "bytes": pushed.bytes,
            "stats": {"params_updated": stats.params_updated, "params_transmitted": stats.params_transmitted,
                      "bytes": stats.bytes, "value_bytes": stats.value_bytes},
        }  # fmt: skip

    def pull_and_aggregate(self, round: int) -> dict[str, Any]:
        """Pull the neighbours' revisions of ``round`` (pinned to their tags), aggregate, checkpoint the view."""
        names = [peer_id(self.spec.name, q) for q in self.plan.neighbours]
        pull = self.hub_peer.pull_round(round, names, timeout=self.cfg.pull_timeout)
        received = {peer_index(pid): u for pid, u in pull.updates.items()}
        if round == 0:
            for q, update in received.items():
                self.structure[q] = update
        self.view = self._aggregate(received)
        save_view(checkpoint_path(self.method_dir, self.peer, round), self.view)
        return {
            "skipped": sorted(pull.skipped),
            "rejected": {k: str(v) for k, v in pull.rejected.items()},
            "revisions": dict(pull.revisions),
        }

    def _with_structure(self, q: int, update: Any) -> Any:
        if isinstance(update, DenseUpdate) or update.has_structure:
            return update
        s = self.structure[q]
        return SparseUpdate(values=update.values, masks=s.masks, shapes=s.shapes, metadata=update.metadata)

    def _aggregate(self, received: Mapping[int, Any]) -> dict[str, Any]:
        """The new view from the own trained update and the neighbours' (method.md §3)."""
        own = self._with_structure(self.peer, self._own)
        group = {self.peer: own, **{q: self._with_structure(q, u) for q, u in received.items()}}
        order = sorted(group)
        weights = [self.plan.weights.get(q, 1.0) for q in order]
        if self.spec.aggregation == "none":
            return {self.name: own}
        if self.spec.aggregation == "fedavg":
            avg = fedavg([group[q].values for q in order], weights)
            return {self.name: DenseUpdate(values=avg, metadata=own.metadata)}
        b_bar = masked_average([group[q].values for q in order], [group[q].masks for q in order], weights)
        keep = [self.peer] if self.spec.forward == "own" else [q for q in self.plan.forward if q in group]
        parts = member_views(b_bar, [group[q] for q in keep])
        view = dict(self.view) if self.spec.forward == "cluster" else {}
        view.update({adapter_name(q): part for q, part in zip(keep, parts)})  # skipped members keep old values
        return view


def round_record(round: int, trained: Mapping[int, dict], pulled: Mapping[int, dict]) -> dict[str, Any]:
    """The driver's JSON record of one round from its workers' answers."""
    return {
        "round": round,
        "train_loss": {str(p): t["loss"] for p, t in trained.items()},
        "bytes_pushed": {str(p): t["bytes"] for p, t in trained.items()},
        "pulls": {str(p): v for p, v in pulled.items()},
    }


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a crash never leaves half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
