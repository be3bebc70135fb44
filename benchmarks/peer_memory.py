"""Memory per extra in-process peer: N :class:`~sorlora.protocol.program.PeerProgram` s of one collaboration stepped in
one process around one shared frozen base model (``sorlora run --engine local``), method ``solora`` (clusters,
cluster-wide forward, inter-cluster exchange: the method that holds the most of the others' parts).

Each population registers, plans, calibrates, trains one round of one local step on small data and exchanges
experts; memory is taken when every program has reached ``publish`` (everything of the rounds still held; publishing
itself builds one implicit MoE at a time, which is transient). The plan is computed once per population and each
program given its own copy (:class:`_PlanOnce`: the cluster topology of 100 members takes ~20 s per program). Counted precisely, not from the noisy RSS: torch
tensor storage reachable from Python objects (unique storages, ``gc``) plus Python allocations (``tracemalloc``),
both measured before the programs are created and after. The anchor is one member's adapter in the shared model
(A + B + mask: what the issue's "~2.5 MiB per extra peer" counts). The same population without the shared
:class:`~sorlora.runtime.sharing.TensorPool` shows what it saves; the RSS growth is reported beside, as a cross-check.

``python -m benchmarks.peer_memory --model smollm2 --counts 100`` measures the real SmolLM2-135M (rank 4: the
orthogonal slots of ``in_features // r`` = 144 allow 100 members).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

import sorlora.protocol.program as peer_program
from peft_sorlora.base_model import BUNDLED_BASE_ID, base_fingerprint, set_base_identity
from peft_sorlora.calibration import solora_layers
from sorlora.data.synthetic import synthetic_task
from sorlora.protocol.collab import create_collaboration
from sorlora.protocol.terms import CollabTerms
from sorlora.runtime.model_loading import TINY_BASE_ID, load_base
from sorlora.runtime.workspace import adapter_name
from sorlora.simulation.engines.base import PeerLaunch
from sorlora.simulation.engines.local import InProcessEngine
from sorlora_gossip import LocalHub

from .common import constant, release_free_memory, rows_against, rss_bytes, seed_everything

__all__ = ["run", "ENTRY", "measure_population"]

ENTRY = "peer_memory"
RANK, SPARSITY, METHOD = 4, 0.25, "solora"
TINY_ID = "bench/tiny-random-llama-512"  # a wider tiny Llama: 512 // 4 = 128 orthogonal slots for 100 members


MODELS = {"tiny": "tiny-llama", "tiny-512": "tiny-llama-512", "smollm2": "smollm2-135m"}  # --model -> label


def _base(model: str) -> tuple[torch.nn.Module, object, str]:
    if model in ("smollm2", "tiny"):
        base_id = BUNDLED_BASE_ID if model == "smollm2" else TINY_BASE_ID  # the tiny one: 32 // 4 = 8 slots
        base, tokenizer, _ = load_base(base_id)
        return base, tokenizer, base_id
    from sorlora.runtime.model_loading import tiny_random_model

    base, tokenizer = tiny_random_model(hidden_size=512, num_hidden_layers=2, seed=0)
    set_base_identity(base, TINY_ID)
    for p in base.parameters():
        p.requires_grad_(False)
    return base, tokenizer, TINY_ID


def _tensor_bytes() -> int:
    """Bytes of the distinct torch storages reachable from Python objects."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def _snapshot() -> dict[str, int]:
    release_free_memory()
    return {"tensors": _tensor_bytes(), "python": tracemalloc.get_traced_memory()[0], "rss": rss_bytes()}


def _adapter_bytes(engine: InProcessEngine) -> int:
    """A + B + mask of member 0's adapter in the shared model."""
    (ws,) = engine._workspaces.values()
    name = adapter_name(0)
    return sum(
        t.numel() * t.element_size()
        for layer in solora_layers(ws.model, name)
        for t in (layer.solora_A[name], layer.solora_B[name], layer.solora_mask[name])
    )


class _PlanOnce:
    """``compute_plan`` computed once per collaboration commit, each caller given its own deep copy (so every
    program still holds a plan of its own, as it would): at 100 members the cluster topology costs ~20 s per
    program on this machine, and every member's recomputation of the same pure function measures nothing here."""

    def __init__(self, compute) -> None:
        self.compute, self.plans = compute, {}

    def __call__(self, terms, registrations, *, collab_commit, **options):
        key = (terms.sha256(), collab_commit, tuple(r.peer for r in registrations), repr(sorted(options.items())))
        if key not in self.plans:
            self.plans[key] = self.compute(terms, registrations, collab_commit=collab_commit, **options)
        return copy.deepcopy(self.plans[key])


def measure_population(base, tokenizer, base_id: str, n: int, root: Path, *, pooled: bool = True,
                       max_seconds: float = 7200.0) -> dict[str, float]:  # fmt: skip
    """Run ``n`` in-process peers to the publish phase; bytes per peer (tensors, Python, RSS) and the adapter's."""
    terms = CollabTerms(
        base_model=base_id, base_fingerprint=base_fingerprint(base), method=METHOD, rank=RANK, sparsity=SPARSITY,
        rounds=1, local_steps=1, batch_size=2, max_len=32, max_members=n, peers_per_user=n, round_timeout_s=max_seconds,
        s_max=0.5,
    )  # fmt: skip
    tasks = [synthetic_task(t, n_train=4 * n, n_test=2) for t in ("synthetic-alpha", "synthetic-beta")]
    hub = LocalHub(root / f"hub-{n}-{pooled}", namespace="bench")
    create_collaboration(hub, "bench/memory", terms)
    launches = [
        PeerLaunch(peer_id=f"bench/peer{i:03d}", task=tasks[i % 2].name, train=tasks[i % 2].train[i // 2 :: n],
                   state_dir=root / f"state-{n}-{pooled}" / f"{i:03d}")
        for i in range(n)
    ]  # fmt: skip
    engine = InProcessEngine(base=base, tokenizer=tokenizer, progress=False)
    if not pooled:
        engine.tensor_pool = None
    before = _snapshot()
    programs = engine.programs(hub, "bench/memory", launches)
    deadline = time.monotonic() + max_seconds
    plan_once = _PlanOnce(peer_program.compute_plan)
    peer_program.compute_plan = plan_once
    try:
        while any(p.phase != "publish" for p in programs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} peers not at publish after {max_seconds:g} s")
            live = [p for p in programs if p.phase != "publish"]
            for p in live:
                p.step()
            if all(p.waiting for p in live):
                time.sleep(0.01)
        after = _snapshot()
        adapter = _adapter_bytes(engine)
    finally:
        peer_program.compute_plan = plan_once.compute
        del programs
        engine.release()
        gc.collect()
    out = {k: (after[k] - before[k]) / n for k in before}
    out["total"] = out["tensors"] + out["python"]
    out["adapter"] = adapter
    return out


def run(repeats: int = 5, quick: bool = False, counts: tuple[int, ...] | None = None,
        model: str | None = None) -> list[dict]:  # fmt: skip
    """Rows of bytes per peer at each count in ``counts`` on ``model`` (a key of :data:`MODELS`; default: 10, 50
    and 100 peers on ``tiny-512``; quick: 3 and 6 on ``tiny``), and at the largest count without the tensor pool
    (not on SmolLM2, where that costs minutes more). Deterministic counts: ``repeats`` is not used."""
    del repeats
    seed_everything()
    model = model or ("tiny" if quick else "tiny-512")
    counts = counts or ((3, 6) if quick else (10, 50, 100))
    base, tokenizer, base_id = _base(model)
    label = MODELS[model]
    results: dict[str, dict[str, float]] = {}
    started = tracemalloc.is_tracing()
    if not started:
        tracemalloc.start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-peer-memory-") as tmp:
            # warm-up: first-use costs (imports, PEFT's first wrap, template and type caches) are nobody's peer
            measure_population(base, tokenizer, base_id, 2, Path(tmp) / "warm-up")
            for n in counts:
                results[f"{n}_peers"] = measure_population(base, tokenizer, base_id, n, Path(tmp))
                print(f"peer_memory {label}: {n} peers: {json.dumps(results[f'{n}_peers'])}", file=sys.stderr)
            if model != "smollm2":
                results[f"{counts[-1]}_peers_without_pool"] = measure_population(
                    base, tokenizer, base_id, counts[-1], Path(tmp), pooled=False
                )
    finally:
        if not started:
            tracemalloc.stop()
    adapter = next(iter(results.values()))["adapter"]
    figures = {"one_adapter": constant(adapter)}
    figures.update({k: constant(v["total"]) for k, v in results.items()})
    figures.update({f"{k}_rss": constant(v["rss"]) for k, v in results.items() if not k.endswith("pool")})
    params = {"model": label, "method": METHOD, "rank": RANK, "sparsity": SPARSITY, "rounds": 1, "local_steps": 1,
              "peer_counts": list(counts), "measured": "tensor storages + tracemalloc, at the publish phase",
              "breakdown": {k: {m: round(v[m]) for m in ("tensors", "python", "rss")} for k, v in results.items()}}  # fmt: skip
    why = ("a peer holds its adapter in the shared model plus its own state: its round-0 structure, its cluster "
           "view, the checkpointed plan and records (Python objects), and its share of the pooled pulled parts")  # fmt: skip
    worse = {k: why for k in figures if k != "one_adapter"}
    for k in figures:
        if k.endswith("without_pool"):
            worse[k] = "every program keeping its own copy of every member's pulled structure and of the experts"
        elif k.endswith("_rss"):
            worse[k] = "RSS growth per peer (allocator slack and freed-but-cached heap included; noisy)"
    rows = rows_against(ENTRY, figures, anchor="one_adapter", unit="bytes/peer",
                        anchor_label="one member's adapter tensors (A + B + mask)", worse_notes=worse, params=params,
                        group=f"{ENTRY}/{label}")  # fmt: skip
    for row in rows:
        row["name"] = f"{label} {row['name']}"
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.peer_memory [--model tiny|smollm2] [--counts 10,100]``: print the rows as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny-512", help="base model of the peers")
    parser.add_argument("--counts", default=None, help="comma-separated peer counts (default 10,50,100)")
    args = parser.parse_args(argv)
    counts = tuple(int(c) for c in args.counts.split(",")) if args.counts else None
    rows = run(counts=counts, model=args.model)
    for row in rows:
        print(json.dumps({k: row[k] for k in ("name", "median", "ratio", "note")}))
    print(json.dumps(rows[0]["params"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
