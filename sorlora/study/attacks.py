"""The attack suite (issue 22): one hostile member among honest ones, and what the honest ones lose of their gain.

A hostile member is an ordinary :class:`~sorlora.protocol.program.PeerProgram` whose pushed updates (or whose
registration) an :class:`Attack` transforms: the values ×10 or ×100, their sign flipped, heavy noise, ±9999 in every
entry, a round-0 mask that holds every entry (with noise where it held nothing), or a registration declaring 10^18
training examples (the weight every average gives it). Everything else it does is honest, so what the others see
is well-formed: only the robust aggregation (:mod:`sorlora_gossip.robust`) and the plan's screening stand between it
and the honest members' models.

For one size of collaboration (``members``, the last one hostile) and each aggregation (``mean``, ``clipped``) the
suite runs the collaboration without an attack and under every attack, on a task where accuracy moves, and scores
each honest member's final view (its own adapter and what its forward holds of the others', as checkpointed after
the last round) on the task's test questions. With ``acc_base`` the bare base's accuracy and ``acc_clean`` the
honest members' mean accuracy without an attack (under the same aggregation), an attack's **lost share** is
``1 - (acc_attack - acc_base) / (acc_clean - acc_base)``: 0 when the attack cost nothing, 1 when it erased the
gain. The robust rule's **cost** is ``1 - gain(clipped, no attack) / gain(mean, no attack)``. :func:`run_suite` runs
every cell once per seed of ``seeds`` (data split, masks, training order); each seed's shares are paired with that
seed's clean run, and over the seeds a share is the mean loss over the mean gain with a 95% t interval
(:func:`share_of_gain`): training noise (trajectories that diverge after any change) dominates, not the test
questions. Each share is also given against the honest members alone (the :data:`ALONE` run of the seed).

Every run counts crashed honest peers (an exception out of ``step``), the records about the hostile member (peer,
round, action, reason: the aggregation's decisions, the plan's exclusions, the pull's rejections), the honest
members rejected by an honest one (false positives) and the honest updates lost (an honest member's round that
another honest member did not use). ``engine`` ``local`` runs every program in this process on a
:class:`~sorlora_gossip.hub.LocalHub`; ``hub-serve`` runs them against a :class:`~sorlora_gossip.hub.HubServer`
on 127.0.0.1 over HTTP with the real ``huggingface_hub`` client, one token per user.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peft_sorlora.base_model import base_fingerprint, set_base_identity
from sorlora_gossip.hub import HfHub, HubServer, LocalHub

from ..atomic import write_json
from ..data.examples import Example, Task, split_examples
from ..data.synthetic import synthetic_task
from ..evaluation.scoring import evaluate
from ..protocol.collab import create_collaboration
from ..protocol.program import PeerData, PeerProgram
from ..protocol.state import load_view, view_path
from ..protocol.terms import CollabTerms
from ..runtime.model_loading import TINY_BASE_ID, tiny_random_model
from ..simulation.engines.local import InProcessEngine

__all__ = [
    "ATTACKS",
    "ENGINES",
    "Attack",
    "HostileProgram",
    "SuiteSettings",
    "attack_table",
    "last_letter_task",
    "lost_share",
    "share_of_gain",
    "task_template",
    "run_cell",
    "run_suite",
    "suite_base",
    "summarise",
]

ENGINES = ("local", "hub-serve")
# the member every plan excludes at registration (a position out of bounds): the honest members alone
ALONE = "absent"


def _noise(v: torch.Tensor, round: int) -> torch.Tensor:  # noqa: A002
    g = torch.Generator().manual_seed(7 + round)
    return v + 10 * (v.norm() / max(v.numel(), 1) ** 0.5 + 1e-3) * torch.randn(v.shape, generator=g)


@dataclass(frozen=True)
class Attack:
    """One hostile behaviour: ``values`` transforms every pushed tensor of values (given the round); ``registration``
    changes the registration's fields; ``dense``: round 0 declares a mask holding every entry (the values it did not
    hold are filled with ``values`` of noise) and later rounds send values for all of them."""

    name: str
    help: str
    values: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    registration: Mapping[str, Any] | None = None
    dense: bool = False


ATTACKS: dict[str, Attack] = {
    a.name: a
    for a in (
        Attack("scaled10", "every value x10", values=lambda v, r: v * 10),
        Attack("scaled100", "every value x100", values=lambda v, r: v * 100),
        Attack("sign_flip", "every value's sign flipped", values=lambda v, r: -v),
        Attack("noise", "Gaussian noise 10x the values' RMS added", values=_noise),
        Attack("pm9999", "every value +9999 or -9999 by its sign", values=lambda v, r: torch.where(v >= 0, 9999.0, -9999.0)),
        Attack("weight_1e18", "registers 10^18 training examples (its weight in every average; the plan bounds it)",
               registration={"n_train": 10**18}),
        Attack("dense_mask", "round 0 declares a mask holding every entry; noise where it held none", dense=True,
               values=_noise),
        Attack(ALONE, "registers a position 1000x out of bounds, so every plan excludes it: the honest members' "
               "collaboration alone (the baseline of 'vs the honest alone')", registration={"position_mm": (10**12, 0)}),
    )
}  # fmt: skip


def _transform(update: Any, attack: Attack, round: int, masks0: dict[str, torch.Tensor] | None) -> Any:  # noqa: A002
    """``update`` as the hostile member pushes it (a ``SparseUpdate``)."""
    values = dict(update.values)
    if attack.dense and masks0 is not None:
        dense = {}
        signs = torch.Generator().manual_seed(11 + round)  # deterministic: the same attack on every engine
        for k, v in values.items():
            held = masks0[k]
            full = torch.zeros(held.shape, dtype=v.dtype)
            full[held] = v
            noise = _noise(torch.zeros_like(full), round) + 10 * (v.abs().mean() if v.numel() else 1e-3)
            sign = torch.sign(torch.randn(full.shape, generator=signs))
            dense[k] = torch.where(held, full, noise * sign).flatten()
        values = dense
        if update.has_structure:
            masks = {k: torch.ones_like(m) for k, m in update.masks.items()}
            return dataclasses.replace(update, values=values, masks=masks)
        return dataclasses.replace(update, values=values)
    if attack.values is not None:
        values = {k: attack.values(v, round).to(v.dtype) for k, v in values.items()}
    return dataclasses.replace(update, values=values)


class _HostilePeer:
    """A hub peer whose pushes go through the attack; everything else is the honest peer's."""

    def __init__(self, peer: Any, attack: Attack, masks0: dict[str, torch.Tensor]) -> None:
        self._peer, self._attack, self._masks0 = peer, attack, masks0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._peer, name)

    def push_round(self, round: int, update: Any, *, metrics: Mapping[str, float] | None = None) -> Any:  # noqa: A002
        return self._peer.push_round(round, _transform(update, self._attack, round, self._masks0), metrics=metrics)


class HostileProgram(PeerProgram):
    """A member running the honest program whose pushed updates or registration ``attack`` changes."""

    def __init__(self, *args: Any, attack: Attack, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attack = attack

    def _hub_peer(self) -> Any:
        peer = super()._hub_peer()
        if self.attack.values is None and not self.attack.dense:
            return peer
        own = self.structure[self.index]
        return _HostilePeer(peer, self.attack, dict(own.masks) if own.has_structure else {})

    def _own_from_hub(self, round: int) -> Any:  # noqa: A002
        if self.attack.dense:  # what it pushed is not what it trains: it goes on from its own honest update
            return self.kind.values_only(self.ws.own_state(self.name_of(self.index), round=round))
        return super()._own_from_hub(round)

    def _as_registered(self, registration: Any) -> Any:
        change = self.attack.registration
        return dataclasses.replace(registration, **change) if change else registration


LAST_LETTER = "last-letter"
# equal length, so the option's length favours neither; no leading space: the cue (the word's last letter) is the
# token right before the answer's first, discriminating byte
_LAST_LETTER_OPTIONS = ("blue", "pink")


def last_letter_task(*, n_train: int, n_test: int, seed: int = 0) -> Task:
    """The suite's task: the last letter of a random word fixes its colour (a random map of the 26 letters, 13 each, to
    two options of equal length). Unlike :func:`~sorlora.data.synthetic.synthetic_task` (the first letter), the cue sits
    right before the answer, so the tiny random Llama's adapters learn it in a few rounds and accuracy moves."""
    rng = random.Random(f"{LAST_LETTER}:{seed}")
    letters = "abcdefghijklmnopqrstuvwxyz"
    halves = [0, 1] * 13
    rng.shuffle(halves)
    colour = dict(zip(letters, halves))  # 13 letters each: the base's bias gives no head start
    examples: dict[str, Example] = {}
    while len(examples) < n_train + n_test:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(3, 6)))
        examples.setdefault(word, Example(f"Word: {word}", _LAST_LETTER_OPTIONS, colour[word[-1]]))
    return split_examples(LAST_LETTER, "2-way last letter (the attack suite's)", {"all": list(examples.values())},
                          n_train=n_train, n_test=n_test, seed=seed)  # fmt: skip


@dataclass(frozen=True)
class SuiteSettings:
    """What the suite runs: a tiny random Llama on a task where its accuracy moves within a minute."""

    members: tuple[int, ...] = field(default=(4, 8), metadata={"help": "collaboration sizes (one member hostile)"})
    attacks: tuple[str, ...] = field(default=tuple(ATTACKS), metadata={"help": f"of {', '.join(ATTACKS)}"})
    aggregations: tuple[str, ...] = field(default=("mean", "clipped"), metadata={"help": "strategies compared"})
    engines: tuple[str, ...] = field(default=("local",), metadata={"help": f"of {', '.join(ENGINES)}"})
    task: str = field(
        default=LAST_LETTER,
        metadata={"help": f"{LAST_LETTER!r} (last_letter_task: the tiny model's accuracy moves) or a synthetic task "
                  "name (sorlora.data.synthetic: the tiny model's LoRA learns only the answer prior there)"},
    )  # fmt: skip
    n_train: int = field(default=96, metadata={"help": "training examples per member"})
    n_test: int = field(
        default=384, metadata={"help": "test questions (the accuracy; 384: a paired difference's question noise "
                               "about 2 points, under the seeds' spread)"}
    )  # fmt: skip
    rounds: int = field(default=5, metadata={"help": "gossip rounds"})
    local_steps: int = field(default=15, metadata={"help": "AdamW steps per round"})
    batch_size: int = field(default=16, metadata={"help": "batch size"})
    lr: float = field(default=5e-3, metadata={"help": "AdamW learning rate"})
    hidden_size: int = field(default=64, metadata={"help": "width of the tiny random Llama (64: 8 members of rank 8)"})
    rank: int = field(default=8, metadata={"help": "LoRA rank (at most the width / members: orthogonal A slots)"})
    sparsity: float = field(default=0.5, metadata={"help": "share of B entries each member trains"})
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        metadata={"help": "adapted modules (all of them: the tiny model learns the task in a few rounds)"},
    )
    method: str = field(default="solora-single", metadata={"help": "method (one cluster: everyone averages)"})
    max_seconds: float = field(default=600.0, metadata={"help": "per collaboration"})
    seed: int = field(default=0, metadata={"help": "data and terms seed of one collaboration (run_cell's)"})
    seeds: tuple[int, ...] = field(
        default=(0,),
        metadata={"help": "seeds run_suite runs every cell with (each replaces seed); a cell's lost share is paired "
                  "with the no-attack run of its own seed, then averaged over the seeds with a 95% t interval"},
    )  # fmt: skip


def suite_base(s: SuiteSettings) -> tuple[Any, Any]:
    """The frozen base of the suite: the tiny random Llama (seed 0) of width ``s.hidden_size``, named
    ``tiny-random-llama-h<width>`` (its own fingerprint: it is not the tests' 32-wide one)."""
    model, tokenizer = tiny_random_model(hidden_size=s.hidden_size, num_hidden_layers=2, seed=0)
    set_base_identity(model, f"{TINY_BASE_ID}-h{s.hidden_size}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def _users(n: int) -> list[str]:
    return [f"u{i}" for i in range(n - 1)] + ["hostile"]


def task_template() -> str:
    """What every prompt and answer of :func:`last_letter_task` shares (an attacker knows it): its fixed text."""
    return "Word: " + "".join(_LAST_LETTER_OPTIONS)


def _data(s: SuiteSettings, n: int) -> tuple[list[Any], Task]:
    """Each member's own training shard (disjoint) and the test questions."""
    if s.task == LAST_LETTER:
        task = last_letter_task(n_train=s.n_train * n, n_test=s.n_test, seed=s.seed)
    else:
        task = synthetic_task(s.task, n_train=s.n_train * n, n_test=s.n_test, seed=s.seed)
    shards = [task.train[i * s.n_train : (i + 1) * s.n_train] for i in range(n)]
    return shards, task


def _terms(s: SuiteSettings, base: Any, n: int, aggregation: str) -> CollabTerms:
    """The collaboration's terms; the rank is at most ``width // n`` (every member needs its own orthogonal A)."""
    rank = max(1, min(s.rank, int(base.config.hidden_size) // n))
    return CollabTerms(
        base_model=base.name_or_path, base_fingerprint=base_fingerprint(base), method=s.method, rank=rank,
        target_modules=s.target_modules, sparsity=s.sparsity, rounds=s.rounds, local_steps=s.local_steps, batch_size=s.batch_size, max_len=48,
        max_members=n, round_timeout_s=120.0, lr=s.lr, seed=s.seed, aggregation=aggregation,
    )  # fmt: skip


def drive(programs: Sequence[PeerProgram], max_seconds: float) -> dict[str, str]:
    """Step every program in turn until each is done or crashed, for at most ``max_seconds``: the crashes, peer ->
    ``"Type: message"`` (an exception out of ``step``; a program not done by then counts too). The attack suite and
    the protocol tests count crashes with it instead of letting the first one stop the others."""
    crashed: dict[str, str] = {}
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        live = [p for p in programs if not p.done and p.peer_id not in crashed]
        if not live:
            break
        for p in live:
            try:
                p.step()
            except Exception as exc:  # noqa: BLE001 - the suite counts crashes, it does not hide them
                crashed[p.peer_id] = f"{type(exc).__name__}: {exc}"
        if all(p.waiting for p in live if p.peer_id not in crashed):
            time.sleep(0.02)
    for p in programs:
        if not p.done and p.peer_id not in crashed:
            crashed[p.peer_id] = f"not done after {max_seconds:g} s (phase {p.phase})"
    return crashed


def _accuracy(ws: Any, tokenizer: Any, task: Task, view: Mapping[str, Any] | None) -> float:
    kw = {"batch_size": 16, "max_len": 48}
    if view is None:
        with ws.bare_base():
            return float(evaluate(ws.network, tokenizer, task, **kw)["accuracy"])
    ws.load_view(view)
    ws.activate(list(view))
    return float(evaluate(ws.network, tokenizer, task, **kw)["accuracy"])


def run_cell(
    s: SuiteSettings,
    workdir: str | Path,
    *,
    members: int,
    aggregation: str,
    attack: str | None,
    engine: str = "local",
    base: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """One collaboration of ``members`` (the last hostile with ``attack``; None: all honest) under ``aggregation``
    on ``engine``: crashes, records about the hostile member, honest rejections and lost updates, the honest
    members' accuracies and the bare base's (see the module docstring)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    workdir = Path(workdir)
    model, tokenizer = base if base is not None else suite_base(s)
    users = _users(members)
    hostile_id = f"{users[-1]}/dev"
    shards, task = _data(s, members)
    terms = _terms(s, model, members, aggregation)
    started = time.perf_counter()
    server = None
    if engine == "local":
        root = LocalHub(workdir / "hub", namespace="lab")
        hubs = {u: root for u in users}
        owner = root
    else:
        tokens = {u: f"hf_{secrets.token_hex(16)}" for u in [*users, "lab"]}
        server = HubServer(workdir / "server", tokens=tokens).start()

        def hf(user: str) -> HfHub:
            return HfHub(server.endpoint, token=tokens[user], namespace=user, cache_dir=workdir / f"cache-{user}",
                         backoff=0.01, max_backoff=0.1)  # fmt: skip

        hubs = {u: hf(u) for u in users}
        owner = hf("lab")
    try:
        create_collaboration(owner, "lab/c", terms)
        eng = InProcessEngine(base=model, tokenizer=tokenizer, progress=False)
        programs = [
            (HostileProgram if attack is not None and u == users[-1] else PeerProgram)(
                hub=hubs[u], collab_id="lab/c", peer_id=f"{u}/dev", state_dir=workdir / "state" / u,
                workspace=eng.workspace, data=PeerData(task=task.name, train=shards[i]), poll_interval=0.02,
                **({"attack": ATTACKS[attack]} if attack is not None and u == users[-1] else {}),
            )
            for i, u in enumerate(users)
        ]  # fmt: skip
        try:
            crashed = drive(programs, s.max_seconds)
            ws, _ = eng.workspace(terms)
            honest = [p for p in programs if p.peer_id != hostile_id or attack is None]
            accuracy = {}
            for p in honest:
                if p.peer_id in crashed:
                    continue
                path = view_path(p.state_dir, terms.rounds - 1)
                accuracy[p.peer_id] = _accuracy(ws, tokenizer, task, load_view(path, terms.spec.kind.payload_cls))
            base_accuracy = _accuracy(ws, tokenizer, task, None)
        finally:
            eng.release()
        plan = json.loads(owner.read_bytes("lab/c", "plan.json", revision="main"))
        reports = {}
        for p in honest:
            if p.done:
                reports[p.peer_id] = json.loads(owner.read_bytes(owner.repo_id(p.peer_id), "report.json",
                                                                 revision="final"))  # fmt: skip
    finally:
        if server is not None:
            server.stop()
    return _summarise(
        attack=attack, aggregation=aggregation, members=members, engine=engine,
        hostile=hostile_id if attack is not None else "",
        honest=[p.peer_id for p in honest], crashed=crashed, reports=reports, plan=plan, accuracy=accuracy,
        base_accuracy=base_accuracy, rounds=terms.rounds, seconds=time.perf_counter() - started,
    )  # fmt: skip


def _summarise(*, attack, aggregation, members, engine, hostile, honest, crashed, reports, plan, accuracy,
               base_accuracy, rounds, seconds) -> dict[str, Any]:  # fmt: skip
    about, false_pos, lost = [], [], []
    excluded = dict(plan.get("excluded") or {})
    if hostile in excluded:
        about.append({"by": "plan", "peer": hostile, "round": None, "action": "excluded", "reason": excluded[hostile]})
    bounded = dict(plan.get("weights_bounded") or {})
    if hostile in bounded:
        about.append({"by": "plan", "peer": hostile, "round": None, "action": "clipped", "reason": bounded[hostile]})
    for receiver, rep in reports.items():
        for rec in rep["records"]:
            for d in rec.get("decisions", []):
                if d.get("peer") == hostile and d["action"] in ("rejected", "clipped"):
                    about.append({"by": receiver, **d})
                elif d.get("peer") in honest and d.get("peer") != receiver and d["action"] == "rejected":
                    false_pos.append({"by": receiver, **d})
            for peer, why in (rec.get("rejected") or {}).items():
                (about if peer == hostile else false_pos).append(
                    {"by": receiver, "peer": peer, "round": rec["round"], "action": "rejected", "reason": why}
                )
            used = set(rec.get("used") or {})
            for q in honest:
                if q != receiver and q in plan["members"] and q not in used:
                    lost.append({"by": receiver, "peer": q, "round": rec["round"]})
    reasons = sorted({_reason_kind(a["reason"]) for a in about})
    return {
        "attack": attack or "none", "aggregation": aggregation, "members": members, "engine": engine,
        "crashed_honest": {p: e[:300] for p, e in crashed.items() if p != hostile or attack is None},
        "hostile_crashed": crashed.get(hostile) if attack is not None else None,
        "records_about_hostile": len(about), "reasons": reasons, "examples": about[:3],
        "honest_rejected": len(false_pos), "honest_rejections": false_pos[:5],
        "updates_lost": len(lost), "published": len(reports), "honest": len(honest),
        "accuracy": accuracy, "honest_accuracy": statistics.fmean(accuracy.values()) if accuracy else float("nan"),
        "base_accuracy": base_accuracy, "rounds": rounds, "seconds": round(seconds, 1),
        "start_loss": _mean_loss(reports, 0), "final_loss": _mean_loss(reports, -1),
    }  # fmt: skip


def _mean_loss(reports: Mapping[str, Any], at: int) -> float:
    losses = [
        r["records"][at]["loss"] for r in reports.values() if r["records"] and r["records"][at]["loss"] is not None
    ]
    return statistics.fmean(losses) if losses else float("nan")


def _reason_kind(reason: str) -> str:
    """A reason without its numbers (for the table)."""
    head = reason.split(":")[0] if reason.startswith(("direction", "dropped")) else reason
    words = [w for w in head.replace("(", " ").split() if not any(c.isdigit() for c in w)]
    return " ".join(words[:6])


def lost_share(base: float, clean: float, attacked: float) -> float | None:
    """``1 - (attacked - base) / (clean - base)``: the share of the honest gain an attack erased (None: no gain)."""
    gain = clean - base
    if not math.isfinite(gain) or gain <= 0:
        return None
    return 1.0 - (attacked - base) / gain


def run_suite(s: SuiteSettings, out_dir: str | Path, *, progress: bool = True, resume: bool = False) -> dict[str, Any]:
    """Every (engine, size, aggregation, seed, attack) cell and its no-attack run; writes ``attacks.json``,
    ``attacks.md`` and ``attacks.png`` under ``out_dir`` after every cell (a stopped suite keeps what it ran).

    ``resume``: the cells of an ``attacks.json`` already in ``out_dir`` whose run settings equal ``s`` (every field
    but the lists of what to run) are kept instead of run again, e.g. the ``mean`` cells when only the robust rule
    changed. The result's ``summary`` has one row per (engine, size, aggregation, attack) over the seeds."""
    unknown = sorted(set(s.attacks) - set(ATTACKS))
    if unknown:
        raise ValueError(f"unknown attacks {unknown}; known: {', '.join(ATTACKS)}")
    if not s.seeds:
        raise ValueError("seeds: need at least one seed")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = _resumable(out_dir / "attacks.json", s) if resume else {}
    model, tokenizer = suite_base(s)
    cells: list[dict[str, Any]] = []
    result: dict[str, Any] = {"settings": dataclasses.asdict(s), "cells": cells, "summary": []}
    work = Path(tempfile.mkdtemp(prefix="sorlora-attacks-"))  # hubs and peers' state: gone after each cell
    try:
        _cells(s, cells, result, work, out_dir, (model, tokenizer), progress, done)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _plot(result, out_dir / "attacks.png")
    return result


# the settings that say what to run, not how a cell runs: cells of a result with other values still compare
_WHAT_TO_RUN = ("members", "attacks", "aggregations", "engines", "seeds", "seed")


def _key(c: Mapping[str, Any]) -> tuple[str, int, str, str, int]:
    return c["engine"], c["members"], c["aggregation"], c["attack"], c.get("seed", 0)


def _resumable(path: Path, s: SuiteSettings) -> dict[tuple[str, int, str, str, int], dict[str, Any]]:
    """The cells of an earlier result at ``path`` that ran under ``s``'s run settings, by key (none if it differs)."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    mine = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(s))).items() if k not in _WHAT_TO_RUN}
    theirs = {k: v for k, v in old.get("settings", {}).items() if k not in _WHAT_TO_RUN}
    if mine != theirs:
        return {}
    return {_key(c): c for c in old.get("cells", [])}


def _cells(s, cells, result, work, out_dir, base, progress, done) -> None:  # noqa: ANN001 - run_suite's loop
    model, tokenizer = base
    for engine in s.engines:
        for n in s.members:
            for aggregation in s.aggregations:
                for seed in s.seeds:
                    for attack in [None, *s.attacks]:
                        cell = done.get((engine, n, aggregation, attack or "none", seed))
                        if cell is None:
                            name = f"{engine}-{n}-{aggregation}-{seed}-{attack or 'none'}"
                            cell = run_cell(dataclasses.replace(s, seed=seed), work / name, members=n,
                                            aggregation=aggregation, attack=attack, engine=engine,
                                            base=(model, tokenizer))  # fmt: skip
                            cell["seed"] = seed
                            shutil.rmtree(work / name, ignore_errors=True)
                        cells.append(cell)
                        _shares(cells)
                        result["summary"] = summarise(cells)
                        if progress:
                            print(_line(cell), flush=True)
                        write_json(out_dir / "attacks.json", result)
                        (out_dir / "attacks.md").write_text(attack_table(result))


def _shares(cells: list[dict[str, Any]]) -> None:
    """Fill every cell's ``lost_share`` (against the no-attack run of its engine, size, aggregation and seed) and
    the no-attack runs' ``robust_cost`` (the robust rule against mean, same seed)."""
    clean = {(c["engine"], c["members"], c["aggregation"], c.get("seed", 0)): c for c in cells if c["attack"] == "none"}
    for c in cells:
        seed = c.get("seed", 0)
        ref = clean.get((c["engine"], c["members"], c["aggregation"], seed))
        c["lost_share"] = (None if ref is None or c["attack"] == "none" else
                           lost_share(c["base_accuracy"], ref["honest_accuracy"], c["honest_accuracy"]))  # fmt: skip
        c["lost_share_loss"] = (None if ref is None or c["attack"] == "none" else  # a loss gain is a fall: negate
                                lost_share(-ref["start_loss"], -ref["final_loss"], -c["final_loss"]))  # fmt: skip
        if c["attack"] == "none" and c["aggregation"] != "mean":
            mean = clean.get((c["engine"], c["members"], "mean", seed))
            c["robust_cost"] = (None if mean is None else
                                lost_share(c["base_accuracy"], mean["honest_accuracy"], c["honest_accuracy"]))  # fmt: skip
            c["robust_cost_loss"] = (None if mean is None else
                                     lost_share(-mean["start_loss"], -mean["final_loss"], -c["final_loss"]))  # fmt: skip


# Student's t 97.5% quantiles for 1..10 degrees of freedom; beyond, the Cornish-Fisher expansion (within 0.003)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def _t975(df: int) -> float:
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def share_of_gain(diffs: Sequence[float | None], gains: Sequence[float | None],
                  per_seed: Sequence[float | None] = ()) -> dict[str, Any]:  # fmt: skip
    """The share of the mean gain lost over the seeds, ``mean(diffs) / mean(gains)``, with a 95% t interval:
    ``diffs[s]`` is what seed ``s`` lost (clean minus attacked, same seed: paired) and ``gains[s]`` its clean gain.
    The interval is the t interval of the mean difference over the seeds (the unit: training and test-question
    noise both count) divided by the mean gain. A ratio of means, so a seed whose clean run barely learned does
    not dominate as it would a mean of per-seed ratios (``per_seed``, kept for the table). Seeds with a missing
    value are left out; ``mean`` None without a positive mean gain, ``low``/``high`` None with fewer than two."""
    pairs = [(float(d), float(g)) for d, g in zip(diffs, gains)
             if d is not None and g is not None and math.isfinite(d) and math.isfinite(g)]  # fmt: skip
    out: dict[str, Any] = {"mean": None, "low": None, "high": None, "n": len(pairs), "per_seed": list(per_seed)}
    gain = statistics.fmean(g for _, g in pairs) if pairs else 0.0
    if gain <= 0:
        return out
    lost = statistics.fmean(d for d, _ in pairs)
    out["mean"] = lost / gain
    if len(pairs) >= 2:
        half = _t975(len(pairs) - 1) * statistics.stdev(d for d, _ in pairs) / math.sqrt(len(pairs))
        out["low"], out["high"] = (lost - half) / gain, (lost + half) / gain
    return out


def summarise(cells: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (engine, size, aggregation, attack) over its seeds (cells with ``lost_share`` filled by
    :func:`_shares`): the honest members' mean accuracy, the lost shares (accuracy and loss) and, for the no-attack
    runs of a robust rule, its cost against ``mean``, each as :func:`share_of_gain` paired per seed with the clean
    run of that seed; the counts summed over the seeds. ``lost_vs_alone``: the share lost against the honest members
    alone (the :data:`ALONE` run of the same seed, where the plan excluded the hostile member at registration): what
    the hostile member's presence costs beyond the loss of one member's data and slot."""
    groups: dict[tuple[str, int, str, str], list[Mapping[str, Any]]] = {}
    clean, clean_alone = {}, {}
    for c in cells:
        groups.setdefault(_key(c)[:4], []).append(c)
        if c["attack"] == "none":
            clean[(c["engine"], c["members"], c["aggregation"], c.get("seed", 0))] = c
        if c["attack"] == ALONE:
            clean_alone[(c["engine"], c["members"], c["aggregation"], c.get("seed", 0))] = c
    rows = []
    for (engine, n, aggregation, attack), cs in groups.items():
        cs = sorted(cs, key=lambda c: c.get("seed", 0))
        refs = [clean.get((engine, n, aggregation if attack != "none" else "mean", c.get("seed", 0))) for c in cs]
        pairs = [(c, r) for c, r in zip(cs, refs) if r is not None and (attack != "none" or aggregation != "mean")]
        acc = share_of_gain([r["honest_accuracy"] - c["honest_accuracy"] for c, r in pairs],
                            [r["honest_accuracy"] - c["base_accuracy"] for c, r in pairs],
                            [c.get("lost_share" if attack != "none" else "robust_cost") for c, _ in pairs])  # fmt: skip
        loss = share_of_gain([c["final_loss"] - r["final_loss"] for c, r in pairs],
                             [r["start_loss"] - r["final_loss"] for c, r in pairs],
                             [c.get("lost_share_loss" if attack != "none" else "robust_cost_loss") for c, _ in pairs])  # fmt: skip
        alone = [(c, clean_alone.get((engine, n, aggregation, c.get("seed", 0)))) for c in cs]
        alone = [(c, a) for c, a in alone if a is not None and attack not in ("none", ALONE)]
        about = [c for c in cs if c["examples"]]
        rows.append({
            "engine": engine, "members": n, "aggregation": aggregation, "attack": attack,
            "seeds": [c.get("seed", 0) for c in cs],
            "accuracy": statistics.fmean(c["honest_accuracy"] for c in cs),
            "base_accuracy": statistics.fmean(c["base_accuracy"] for c in cs),
            "lost": acc if attack != "none" else None, "lost_loss": loss if attack != "none" else None,
            "robust_cost": acc if attack == "none" and pairs else None,
            "robust_cost_loss": loss if attack == "none" and pairs else None,
            "lost_vs_alone": share_of_gain([a["honest_accuracy"] - c["honest_accuracy"] for c, a in alone],
                                           [a["honest_accuracy"] - a["base_accuracy"] for c, a in alone],
                                           [lost_share(a["base_accuracy"], a["honest_accuracy"], c["honest_accuracy"])
                                            for c, a in alone]) if alone else None,
            "crashed_honest": sum(len(c["crashed_honest"]) for c in cs),
            "honest_rejected": sum(c["honest_rejected"] for c in cs),
            "updates_lost": sum(c["updates_lost"] for c in cs),
            "records_about_hostile": sum(c["records_about_hostile"] for c in cs),
            "reasons": sorted({r for c in cs for r in c["reasons"]}),
            "examples": about[0]["examples"] if about else [],
            "seconds": round(sum(c["seconds"] for c in cs), 1),
        })  # fmt: skip
    return rows


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _interval(e: Mapping[str, Any] | None) -> str:
    """``12% [3, 21]``: the mean over seeds and its 95% interval (the mean alone for one seed)."""
    if e is None or e["mean"] is None:
        return "n/a"
    if e["low"] is None:
        return _pct(e["mean"])
    return f"{_pct(e['mean'])} [{100 * e['low']:.0f}, {100 * e['high']:.0f}]"


def _per_seed(e: Mapping[str, Any] | None) -> str:
    if e is None or len(e["per_seed"]) < 2:
        return ""
    return " ".join("n/a" if v is None else f"{100 * v:.0f}" for v in e["per_seed"])


def _line(c: dict[str, Any]) -> str:
    return (f"{c['engine']} n={c['members']} seed {c.get('seed', 0)} {c['aggregation']:>7} {c['attack']:<11} acc "
            f"{c['honest_accuracy']:.3f} (base {c['base_accuracy']:.3f}) lost {_pct(c.get('lost_share'))} records "
            f"{c['records_about_hostile']} crashed {len(c['crashed_honest'])} honest rejected {c['honest_rejected']} "
            f"lost updates {c['updates_lost']} ({c['seconds']:.0f} s)")  # fmt: skip


def _acc(r: dict | None) -> str:
    return "" if r is None else f"{r['accuracy']:.3f}"


def _lost(r: dict | None, attack: str) -> str:
    if r is None:
        return ""
    if attack == "none":
        cost, cost_loss = r["robust_cost"], r["robust_cost_loss"]
        return "" if cost is None else f"cost {_interval(cost)} / {_pct(cost_loss['mean'])}"
    return f"{_interval(r['lost'])} / {_pct(r['lost_loss']['mean'])}"


def _reason_cell(r: Mapping[str, Any]) -> str:
    """The first record's reason in full (cut at 110 characters) and how many other kinds of reason there were."""
    first = str(r["examples"][0]["reason"]).replace("|", "/")
    first = first if len(first) <= 110 else first[:107] + "..."
    shown = _reason_kind(str(r["examples"][0]["reason"]))
    others = [k.replace("|", "/") for k in r["reasons"] if k != shown]
    return f"{r['examples'][0]['action']}: {first}" + (f" (also: {'; '.join(others)})" if others else "")


def attack_table(result: Mapping[str, Any]) -> str:
    """The suite's markdown table: a row per (engine, size, attack), mean and clipped side by side, each the mean
    over the seeds with its 95% interval (and clipped's per-seed shares)."""
    rows = result.get("summary") or summarise(result["cells"])
    by = {(r["engine"], r["members"], r["attack"], r["aggregation"]): r for r in rows}
    seeds = sorted({c.get("seed", 0) for c in result["cells"]})
    lines = [
        "# Attack suite: one hostile member, what the honest members lose",
        "",
        "lost (acc) = 1 - (acc_attack - acc_base) / (acc_clean - acc_base) of the honest members' mean test "
        "accuracy; lost (loss) = the same on their mean final training loss (gain: first round's loss minus the "
        "last's); acc_clean / the gain: the same aggregation without an attack, the same seed. Over the seeds "
        f"({', '.join(map(str, seeds))}) a share is the mean loss over the mean gain, paired per seed, with its 95% "
        "t interval over the seeds [low, high] (training and question noise both in it); the per-seed shares of "
        "clipped follow; acc: the mean accuracy over the seeds. In the no-attack row, clipped's entries are the "
        f"robust rule's cost against mean. vs the honest alone: the same share against the {ALONE} run of the seed, "
        "where the plan excluded the hostile member at registration, i.e. the honest members' collaboration without "
        "it (its own row: what one member fewer costs). Records: what the honest members recorded about the hostile one (clipped "
        "runs, all seeds). crashed / honest rejected / lost updates: honest peers, every run of the row.",
        "",
        "| engine | members | attack | acc mean | lost mean (acc / loss) | acc clipped | lost clipped (acc / loss) "
        "| clipped per seed (acc %) | clipped vs the honest alone (acc) | records | a recorded reason (clipped) "
        "| crashed | honest rejected | lost updates |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["engine"], r["members"], r["attack"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2] != "none", k[2]))  # fmt: skip
    for engine, n, attack in keys:
        m, r = by.get((engine, n, attack, "mean")), by.get((engine, n, attack, "clipped"))
        both = [x for x in (m, r) if x is not None]
        reasons = "" if r is None or not r["examples"] else _reason_cell(r)
        share = None if r is None else (r["robust_cost"] if attack == "none" else r["lost"])
        lines.append(
            f"| {engine} | {n} | {attack} | {_acc(m)} | {'' if attack == 'none' else _lost(m, attack)} | {_acc(r)} | "
            f"{_lost(r, attack)} | {_per_seed(share)} | {'' if r is None or r['lost_vs_alone'] is None else _interval(r['lost_vs_alone'])} | "
            f"{'' if r is None else r['records_about_hostile']} | {reasons} | "
            f"{sum(x['crashed_honest'] for x in both)} | {sum(x['honest_rejected'] for x in both)} | "
            f"{sum(x['updates_lost'] for x in both)} |"
        )  # fmt: skip
    base = sorted({round(c["base_accuracy"], 4) for c in result["cells"]})
    seconds = sum(c["seconds"] for c in result["cells"])
    lines += ["", f"Bare base accuracy: {', '.join(f'{b:.3f}' for b in base)}. {len(result['cells'])} collaborations, "
              f"{seconds / 60:.1f} min in all. Settings: {json.dumps(result['settings'], sort_keys=True)}", ""]  # fmt: skip
    return "\n".join(lines)


def _plot(result: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in (result.get("summary") or summarise(result["cells"])) if r["attack"] != "none"]
    if not rows:
        return
    groups = sorted({(r["engine"], r["members"]) for r in rows})
    attacks = sorted({r["attack"] for r in rows})
    by = {(r["engine"], r["members"], r["attack"], r["aggregation"]): r for r in rows}
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (engine, n) in zip(axes[0], groups):
        for k, agg in enumerate(("mean", "clipped")):
            for off, key, hatch in ((0.0, "lost", ""), (0.2, "lost_loss", "//")):
                es = [by[(engine, n, a, agg)][key] if (engine, n, a, agg) in by else None for a in attacks]
                ys = [100 * (e["mean"] or 0.0) if e else 0.0 for e in es]
                err = [[y - 100 * e["low"] if e and e["low"] is not None else 0.0 for y, e in zip(ys, es)],
                       [100 * e["high"] - y if e and e["high"] is not None else 0.0 for y, e in zip(ys, es)]]  # fmt: skip
                ax.bar([i + 0.4 * k + off for i in range(len(attacks))], ys, width=0.2, hatch=hatch, yerr=err,
                       capsize=2, color=f"C{k}", label=f"{agg} ({'accuracy' if key == 'lost' else 'loss'})")  # fmt: skip
        ax.axhline(10, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks([i + 0.3 for i in range(len(attacks))], attacks, rotation=45, ha="right")
        ax.set_title(f"{engine}: 1 hostile of {n}")
        ax.set_ylabel("honest gain lost (%, mean over seeds, 95% CI)")
        ax.set_ylim(-50, 150)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
