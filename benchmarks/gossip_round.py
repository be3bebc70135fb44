"""Gossip round time: N peers (ring, two neighbours each) push and pull one round through a hub, against copying
the same bytes through the file system (the anchor: what moving the payloads costs with no versioning or checks).

A round = every peer pushes its payload (one commit holding ``update.safetensors`` + ``peer.json``, tagged
``round-N``), then every peer pulls its two neighbours' revisions of that round (tag resolve, checksum, safetensors
parse and validation against the round-0 masks). Backends: :class:`sorlora_gossip.LocalHub` (a folder) and
:class:`sorlora_gossip.HfHub` (the real ``huggingface_hub`` client) over HTTP to a :class:`sorlora_gossip.HubServer` on 127.0.0.1,
one client and cache per peer. Round 0 (with masks) is the warm-up; later rounds carry values only.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from peft import get_peft_model

import peft_sorlora
from sorlora_gossip import HfHub, HubServer, LocalHub, Peer

from .common import measure_interleaved, rows_against, seed_everything, smollm2, tiny_llama, token_batch

__all__ = ["run", "ENTRY", "payload_updates"]

ENTRY = "gossip_round"
ANCHOR = "file_copy"
HUB_NOTE = (
    "a versioned, validated exchange: each push is a commit + tag with a SHA-256'd peer.json, each pull resolves "
    "the round tag, re-hashes and parses/validates the payload"
)
HTTP_NOTE = HUB_NOTE + "; over HTTP each push/pull is several requests (preupload, commit, tag, resolve, downloads)"


def payload_updates(model: torch.nn.Module, rounds: int) -> list[peft_sorlora.SparseUpdate]:
    """Round 0..rounds-1 sparse updates of an SO-LoRA adapter (rank 8, q/v, sparsity 0.5) on ``model``."""
    peft_model = get_peft_model(
        model, peft_sorlora.SOLoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], sparsity=0.5)
    )
    peft_model.peft_config["default"].base_model_name_or_path = "benchmark-base"
    peft_sorlora.calibrate(peft_model, [token_batch(peft_model, 2, 32)])
    return [peft_sorlora.get_sparse_update(peft_model, round=r) for r in range(rounds)]


def _ring(n: int) -> dict[str, list[str]]:
    names = [f"peer{i:03d}" for i in range(n)]
    return {names[i]: [names[(i - 1) % n], names[(i + 1) % n]] for i in range(n)}


def _hub_round(peers: dict[str, Peer], ring: dict[str, list[str]], updates: list, counter) -> Callable[[], None]:
    def one_round() -> None:
        r = next(counter)
        for peer in peers.values():
            peer.push_round(r, updates[r])
        for name, peer in peers.items():
            pulled = peer.pull_round(r, ring[name], timeout=60.0)
            if not pulled.complete:
                raise RuntimeError(f"round {r}: {name} missed {pulled.skipped or pulled.rejected}")

    return one_round


def _copy_round(root: Path, ring: dict[str, list[str]], updates: list, counter) -> Callable[[], None]:
    def one_round() -> None:
        r = next(counter)
        data = updates[r].to_bytes()
        for name in ring:
            (root / f"{name}-{r}.safetensors").write_bytes(data)
        for neighbours in ring.values():
            for other in neighbours:
                if len((root / f"{other}-{r}.safetensors").read_bytes()) != len(data):
                    raise RuntimeError("short read")

    return one_round


def _case(label: str, updates: list, n: int, repeats: int, tmp: Path) -> list[dict]:
    ring = _ring(n)
    fns: dict[str, Callable[[], None]] = {}
    copy_dir = tmp / f"copy-{n}"
    copy_dir.mkdir()
    fns[ANCHOR] = _copy_round(copy_dir, ring, updates, itertools.count())
    local = LocalHub(tmp / f"local-{n}", namespace="bench")
    fns["local_hub"] = _hub_round({p: Peer(LocalHub(local.root, namespace="bench"), p) for p in ring}, ring, updates,
                                  itertools.count())  # fmt: skip
    server = HubServer(tmp / f"server-{n}", namespace="bench").start()
    try:
        clients = {
            p: Peer(HfHub(endpoint=server.endpoint, namespace="bench", cache_dir=tmp / f"cache-{n}-{p}"), p)
            for p in ring
        }
        fns["hub_server_http"] = _hub_round(clients, ring, updates, itertools.count())
        times = measure_interleaved(fns, repeats=repeats, warmup=1)
    finally:
        server.stop()
    params = {
        "model": label,
        "peers": n,
        "topology": "ring (2 neighbours)",
        "payload_bytes_round0": len(updates[0].to_bytes()),
        "payload_bytes_round_n": len(updates[1].to_bytes()),
    }
    rows = rows_against(
        ENTRY, times, anchor=ANCHOR, unit="s/round", anchor_label="copying the same bytes",
        worse_notes={"local_hub": HUB_NOTE, "hub_server_http": HTTP_NOTE}, params=params, group=f"{ENTRY}/{label}/{n}",
    )  # fmt: skip
    for row in rows:
        row["name"] = f"{label} {n} peers {row['name']}"
    return rows


def run(repeats: int = 5, quick: bool = False) -> list[dict]:
    """Rows for 4 and 10 peers (quick: 4 peers, tiny-Llama payloads) with SmolLM2-135M-sized payloads."""
    seed_everything()
    label, base = ("tiny-llama", tiny_llama()) if quick else ("smollm2-135m", smollm2()[0])
    updates = payload_updates(base, repeats + 1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-gossip-") as tmp:
        for n in (4,) if quick else (4, 10):
            rows += _case(label, updates, n, repeats, Path(tmp))
    return rows
