"""The peer program: one device's whole collaboration, as a resumable state machine over Hub repos.

:class:`PeerProgram` walks the protocol (``../shared/docs/protocol.md``) one phase per :meth:`PeerProgram.step`:

``register``  load the base (checked against the pinned identity), measure the layer-wise budget and the task
              statistics on its own data, commit its registration to the collaboration repo;
``plan``      once registration closed, check that it admits this member's registration as written, compute the plan
              from the registrations at the pinned commit and commit it if nobody did yet (a cache: a committed
              plan that differs is logged and ignored, every member uses its own);
``calibrate`` create its adapter on its slot, choose its masks;
``train``/``pull``  round r: train ``local_steps`` on its own data, push its revision; then pull the neighbours'
              round-r revisions (waiting up to ``round_timeout_s``; a missing neighbour is skipped and recorded) and
              aggregate;
``exchange``  every ``inter_cluster_every`` rounds and after the last: pull the other clusters' members and form
              their experts, without averaging them into its own (these bytes are counted like all others);
``publish``   its final adapter (tag ``final``, with ``report.json``: losses and bytes per round, skips) and, for
              the MoE method, the collaboration's one implicit MoE (``<user>/<collab>-moe`` of the first member to
              claim it; the others verify it is the one they would build and name it).

A step never blocks: a phase that waits for others returns without progress (:attr:`PeerProgram.waiting`), so
one process can step many programs in turn around one shared base model (the simulation), and ``run`` is a loop
with real waits (deployment). After every phase the state is saved under ``state_dir``; a program killed at any
point and started again resumes from there and from its own revisions on the hub, so nothing is lost or doubled.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from peft_sorlora.base_model import BUNDLED_BASE_ID, base_fingerprint
from peft_sorlora.projection import derive_seed
from sorlora_gossip import Hub, Peer, Rejection
from sorlora_gossip.cards import AdapterCards
from sorlora_gossip.hub.base import EntryNotFound, HubError
from sorlora_gossip.layout import UPDATE_FILE, round_tag

from ..data.examples import Example
from ..data.tokenization import (
    collate_for_training,
    context_continuation_ids,
    encode_for_training,
    n_special_prefix,
    truncate_context,
)
from ..logs import dropping
from ..methods.rules import AGGREGATIONS, FORWARD_RULES, Group, cluster_expert
from ..runtime.model_loading import hosted_base, is_tiny_random, load_base
from ..runtime.sharing import TensorPool
from ..runtime.workspace import Workspace, adapter_name, answer_loss
from .collab import Collaboration
from .plan import compute_plan, majority, plan_differences
from .publish import centroid_bytes, centroids_path, publish_final
from .state import (
    STRUCTURES_FILE,
    experts_path,
    load_reference,
    load_view,
    read_state,
    reference_path,
    save_reference,
    save_view,
    view_path,
    write_state,
)
from .terms import CollabTerms, Registration, TermsError

__all__ = ["CRASH_ENV", "PeerData", "PeerProgram"]

logger = logging.getLogger(__name__)

CRASH_ENV = "SORLORA_CRASH_AT"  # "<peer id>:<phase>:<round>": the process SIGKILLs itself there (fault tests)
CALIBRATION = -1  # the "round" whose first batch calibrates masks and measures the task statistics
POSITION_CELL_MM = 10_000  # a registered position is rounded to 10 m cells (the channel model's path loss
# barely changes within one; a neighbour learns where a device is only to within a cell)
CENTROID_PROMPTS = 64  # training prompts a member's sequence-router centroids are computed from


@dataclass(frozen=True)
class PeerData:
    """A peer's own data: the task's name, its training examples and the questions it holds back to score the final
    models on (``test``, the terms' ``test_share``; never trained on). None of it leaves the device."""

    task: str
    train: Sequence[Example]
    test: Sequence[Example] = ()

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError(f"task {self.task!r}: no training examples")


def _all_finite(losses: Sequence[float], update: Any) -> bool:
    """Whether every training loss and every value of ``update`` is finite (what may be pushed and checkpointed)."""
    values = getattr(update, "values", {}) or {}
    return bool(np.all(np.isfinite(losses))) and all(bool(torch.isfinite(v).all()) for v in values.values())


def coarse_position(position_mm: tuple[int, int] | None) -> tuple[int, int] | None:
    """``position_mm`` rounded to the nearest multiple of :data:`POSITION_CELL_MM` (integer arithmetic: any integer
    goes through; the plan's screening bounds it): what a member registers."""
    if position_mm is None:
        return None
    cell = POSITION_CELL_MM
    return tuple((int(v) + cell // 2) // cell * cell for v in position_mm)  # type: ignore[return-value]


class PeerProgram:
    """One member's life in collaboration ``collab_id`` on ``hub`` (see the module docstring).

    ``peer_id`` is the member's peer repo ``user/name`` (on the real Hub: in the user's own namespace).
    ``workspace``: a function giving the :class:`~sorlora.runtime.workspace.Workspace` to train in once the terms are
    known (the simulation shares one base model among many programs); by default the program loads its own base
    (``model``: a local copy or Hub id of the pinned base, checked against its fingerprint).
    ``position_mm``: this device's position estimate for the channel model (default: derived from its id).
    ``expected_terms``: the terms' sha256 this member agreed to, whole or a prefix of at least 12 hex digits (as
    ``sorlora collab create`` prints it); other terms on the hub stop it with an error.
    ``tensor_pool``: shared by the programs of one process, it keeps one copy of the equal tensors they hold
    (the same members' pulled revisions, views and experts; :mod:`sorlora.runtime.sharing`).
    """

    PHASES = ("register", "plan", "calibrate", "train", "pull", "exchange", "publish", "done")

    def __init__(
        self,
        *,
        hub: Hub,
        collab_id: str,
        peer_id: str,
        data: PeerData,
        state_dir: str | os.PathLike[str],
        workspace: Callable[[CollabTerms], tuple[Workspace, Any]] | None = None,
        model: str | None = None,
        position_mm: tuple[int, int] | None = None,
        expected_terms: str | None = None,
        poll_interval: float = 0.5,
        progress: bool = False,
        tensor_pool: TensorPool | None = None,
    ) -> None:
        if peer_id.count("/") != 1:
            raise ValueError(f"peer id must be a repo id 'user/name', got {peer_id!r}")
        self.hub, self.peer_id, self.data = hub, peer_id, data
        self.user, self.name = peer_id.split("/")
        self.collab = Collaboration(self.hub, collab_id)
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._workspace_factory, self._model = workspace, model
        self.position_mm = position_mm
        self.expected_terms = expected_terms
        self.poll_interval, self.progress = poll_interval, progress
        self.tensor_pool = tensor_pool
        self.state: dict[str, Any] = {"phase": "register", "round": 0, "records": [], "exchanges": []}
        saved = read_state(self.state_dir)
        if saved is not None:
            self.state = saved
        self.waiting = False
        self._ready = False
        self._pending: dict[str, Any] | None = None  # an accumulating pull: {"names", "got", "deadline", ...}

    # ------------------------------------------------------------------ state
    @property
    def phase(self) -> str:
        return self.state["phase"]

    @property
    def done(self) -> bool:
        return self.phase == "done"

    def _save(self, **changes: Any) -> None:
        self.state.update(changes)
        write_state(self.state_dir, self.state)

    @property
    def plan(self) -> dict[str, Any]:
        return self.state["plan"]

    @property
    def index(self) -> int:
        return self.plan["members"].index(self.peer_id)

    def index_of(self, peer: str) -> int:
        return self.plan["members"].index(peer)

    def _cluster(self) -> list[str]:
        return next(c for c in self.plan["clusters"] if self.peer_id in c)

    # ------------------------------------------------------------------ set-up (re-entrant)
    def _prepare(self) -> None:
        """Terms, workspace, batches; after the plan: adapter, hub peer, structures and view, from disk and hub."""
        if self._ready:
            return
        self.terms = self._agreed_terms()
        self.spec = self.terms.spec
        self.kind = self.spec.kind
        if self._workspace_factory is not None:
            self.ws, self.tokenizer = self._workspace_factory(self.terms)
        else:
            model = self._model
            local = is_tiny_random(self.terms.base_model) or self.terms.base_model == BUNDLED_BASE_ID  # no download
            if model is None and self.terms.base_repo and not local:  # the base hosted on the collaboration's hub:
                model = hosted_base(self.hub, self.terms.base_repo, self.state_dir / "hosted-base")  # checked below
            try:
                base, self.tokenizer, _ = load_base(self.terms.base_model, model=model)
            except (OSError, ValueError) as exc:  # transformers' "not a folder nor a Hub id" is an OSError
                source = model or self.terms.base_model
                raise TermsError(
                    f"peer {self.peer_id}: cannot load the base {source!r} ({' '.join(str(exc).split())[:200]}): pass "
                    f"--model PATH_OR_ID, a local copy or Hub id of the pinned base {self.terms.base_model}"
                ) from exc
            self.ws = Workspace(base, self.terms.base_model, self.terms, self.kind)
        found = base_fingerprint(self.ws.base)
        if found != self.terms.base_fingerprint:
            raise TermsError(
                f"peer {self.peer_id}: the base model's weights (fingerprint {found}) are not the pinned base "
                f"{self.terms.base_model} (fingerprint {self.terms.base_fingerprint})"
            )
        self.structure: dict[int, Any] = {}
        self.view: dict[str, Any] = {}
        self.experts: dict[int, dict[int, Any]] = {}
        self.reference: dict[str, torch.Tensor] | None = None  # the last round's dense B̄ (robust aggregation)
        if "plan" in self.state and self.phase != "calibrate":
            self._restore()
        self._ready = True

    def _agreed_terms(self) -> CollabTerms:
        """The collaboration's terms, refused unless they are the ``expected_terms`` this member agreed to."""
        terms = self.collab.terms()
        if self.expected_terms is not None and not terms.sha256().startswith(self.expected_terms.lower()):
            raise TermsError(
                f"collaboration {self.collab.repo_id} has terms {terms.sha256()[:12]}, "
                f"not the {self.expected_terms[:12]} this peer agreed to: refusing to take part"
            )
        return terms

    def preflight(self) -> CollabTerms:
        """Everything this member can check without the base model, before it loads (a model load takes seconds to
        minutes; these are a few small reads): the collaboration exists, its terms parse and are the ones agreed to,
        and, before registering, registration is still open or closed with this peer among its members. Raises the
        error :meth:`step` would raise after the load; returns the terms."""
        terms = self._agreed_terms()
        if self.phase == "register":
            closing = self.collab.closing()
            if closing is not None and self.peer_id not in [r.peer for r in closing.registrations]:
                raise self.collab.refusal(closing, self.peer_id)
        return terms

    def rounds_done(self) -> int:
        """Gossip rounds this member has finished (trained, pushed, pulled and aggregated): what its progress counts."""
        phase, r = self.phase, self.state["round"]
        if phase in ("register", "plan", "calibrate"):
            return 0
        if phase in ("train", "pull"):
            return r
        return r + 1 if phase == "exchange" else self.collab.terms().rounds

    def _restore(self) -> None:
        """Rebuild after a restart: the own structure, the known structures, the view after the last round."""
        cls = self.kind.payload_cls
        self.structure = {int(k[4:]): v for k, v in load_view(self.state_dir / STRUCTURES_FILE, cls).items()}
        r = self.state["round"]
        last = r - 1 if self.phase in ("train", "pull") else r  # the last round whose view was checkpointed
        own = {self.name_of(self.index): self.structure[self.index]}
        self.view = load_view(view_path(self.state_dir, last), cls) if last >= 0 else own
        self.reference = load_reference(reference_path(self.state_dir, last)) if last >= 0 else None
        if self.spec.cotrain_every:  # the experts the coming rounds train alongside: the latest exchange's
            done = [e["round"] for e in self.state.get("exchanges", []) if e["round"] <= last]
            if done:
                self.load_experts(max(done))
        self.peer = self._hub_peer()
        self.peer.last_pushed_round()
        if self.phase == "pull":  # the own update of this round is on the hub already: use it as pushed
            self._own = self._own_from_hub(self.state["round"])

    def name_of(self, index: int) -> str:
        return adapter_name(index)

    def _crash_point(self, tag: str) -> None:
        """Die by SIGKILL at a named point (fault tests set ``SORLORA_CRASH_AT``); once per state directory, so a
        restarted peer (by hand, or by Ray) runs on."""
        marker = self.state_dir / "crashed-once"
        if os.environ.get(CRASH_ENV) == tag and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    def _hub_peer(self) -> Peer:
        self.hub.create_repo(self.hub.repo_id(self.peer_id), exist_ok=True)
        own = self.structure[self.index]
        cards = None  # the dense baseline's repo carries no SO-LoRA card
        if self.kind.sparse:
            config = self.kind.peft_config(self.terms, slot=self.index, base_model=self.terms.base_model).to_dict()
            cards = AdapterCards(config, task=self.data.task, peer_id=self.peer_id)
        return Peer(self.hub, self.peer_id, task=self.data.task, cluster=self.plan["clusters"].index(self._cluster()),
                    base_model=self.terms.base_model, config_hash=own.config_hash, payload_cls=self.kind.payload_cls,
                    hook=cards)  # fmt: skip

    def _own_from_hub(self, round: int) -> Any:
        sha = self.hub.resolve(self.hub.repo_id(self.peer_id), round_tag(round))
        data = self.hub.read_bytes(self.hub.repo_id(self.peer_id), UPDATE_FILE, revision=sha)
        masks = None if round == 0 or not self.kind.sparse else self.structure[self.index].masks
        return self.kind.payload_cls.from_bytes(data, masks=masks)

    def batches(self, round: int) -> list[dict[str, torch.Tensor]]:
        """The ``local_steps`` batches of ``round``: a pure function of (seed, the peer's data identity, round, step).

        The data identity is the peer id without a leading ``<method>-`` in its name (common random numbers: the
        simulation names peer i ``<ns>/<method>-peerNN`` in every method, so every method's peer i draws the same
        batches from the same shard; a real peer's name carries no method and is used as it is)."""
        t = self.terms
        data_id = f"{self.user}/{self.name.removeprefix(f'{t.method}-')}"
        out = []
        for step in range(t.local_steps if round != CALIBRATION else 1):
            g = torch.Generator().manual_seed(derive_seed(t.seed, "batch", data_id, round, step) % 2**63)
            idx = torch.randint(len(self.data.train), (t.batch_size,), generator=g).tolist()
            encoded = [encode_for_training(self.data.train[i], self.tokenizer, max_len=t.max_len) for i in idx]
            out.append(collate_for_training(encoded, pad_token_id=self.tokenizer.pad_token_id))
        return out

    # ------------------------------------------------------------------ driving
    def step(self) -> str:
        """Advance by one phase (or one half round); returns the phase now. Sets :attr:`waiting` when it had to
        wait for others (call again later)."""
        if self.done:
            return self.phase
        self._prepare()
        self.waiting = False
        getattr(self, f"_{self.phase}")()
        if self.done:  # what it held is on the hub and on disk: keep nothing of it in memory
            self.view, self.structure, self.experts, self._own, self._pending = {}, {}, {}, None, None
            self._ready = False
        elif self.tensor_pool is not None and not self.waiting:
            self.tensor_pool.share(self.view, self.structure, self.experts, getattr(self, "_own", None))
        return self.phase

    def run(self, *, max_seconds: float | None = None, heartbeat: Callable[[], None] | None = None) -> dict[str, Any]:
        """Step until done, sleeping ``poll_interval`` while waiting; returns the final state. One progress bar
        counts the finished rounds forward (its ETA from their pace), the phase beside it. ``heartbeat`` is called
        after every step (e.g. to renew this copy's claim of the peer id)."""
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        done = self.rounds_done()
        bar = tqdm(total=self.collab.terms().rounds, initial=done, desc=self.peer_id, unit="round",
                   disable=not self.progress, dynamic_ncols=True)  # fmt: skip
        try:
            while not self.done:
                self.step()
                if heartbeat is not None:
                    heartbeat()
                now = self.rounds_done()
                if now > done:
                    bar.update(now - done)
                    done = now
                bar.set_postfix_str(f"{self.phase}{' (waiting)' if self.waiting else ''}", refresh=True)
                if self.waiting:
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"peer {self.peer_id}: still waiting in phase {self.phase} after "
                                           f"{max_seconds:g} s")  # fmt: skip
                    time.sleep(self.poll_interval)
        finally:
            bar.close()
        return self.state

    # ------------------------------------------------------------------ phases
    def _register(self) -> None:
        kind, ws = self.kind, self.ws
        calib = self.batches(CALIBRATION)[0]
        kept = sizes = value_bytes = None
        stats = None
        if kind.calibrates and self.spec.topology == "cluster":
            # the cluster plan needs the layer budget, which depends on the inputs only, not on A: measure it on a
            # scratch adapter (the calibrate phase measures it again with the real slot: the same counts)
            scratch = "registering"
            ws.remove_adapter(scratch)
            ws.add_adapter(scratch, 0)
            try:
                ws.calibrate(scratch, [calib])
                probe = ws.own_state(scratch, round=0)
                kept = {k: int(m.sum()) for k, m in sorted(probe.masks.items())}
                sizes = {k: int(m.numel()) for k, m in sorted(probe.masks.items())}
                value_bytes = int(kind.stats(probe).value_bytes)
            finally:
                ws.remove_adapter(scratch)
        if self.spec.inter_cluster:
            stats = self._task_statistics(calib, sorted(kept or self._layer_keys()))
        files = {}
        if self.spec.final == "moe":  # the sequence router's centroids travel with the registration
            from moe_router.centroids import PROTOCOL_POOL

            summary = self._prompt_summary()
            files[centroids_path(self.user, self.name)] = centroid_bytes(
                summary.centroids, PROTOCOL_POOL, mean=summary.mean, prompts=summary.prompts
            )
        from peft_sorlora import __version__

        registration = self._as_registered(Registration(
            peer=self.peer_id, user=self.user, task=self.data.task, n_train=len(self.data.train),
            terms_sha256=self.terms.sha256(), position_mm=coarse_position(self.position_mm), kept=kept, sizes=sizes,
            value_bytes=value_bytes, software=f"sorlora {__version__}",
        ))  # fmt: skip
        self.collab.register(registration, stats=stats, files=files)
        self._save(phase="plan", registration=registration.to_dict())  # the plan must hold it exactly

    def _as_registered(self, registration: Registration) -> Registration:
        """The registration this member writes, given the one it measured: unchanged here. The attack suite's hostile
        members (:mod:`sorlora.study.attacks`) change it; the member then stands by what it wrote."""
        return registration

    def _layer_keys(self) -> list[str]:
        targets = tuple(self.terms.target_modules)
        return [n for n, _ in self.ws.base.named_modules() if n.rsplit(".", 1)[-1] in targets and "lora" not in n]

    def _task_statistics(self, batch: dict[str, torch.Tensor], keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Mean layer inputs of its own data on the bare base (the implicit MoE routes on them; Eq. 26), released
        with the terms' ``stats_epsilon`` Gaussian noise (moe_router/privacy.py: (ε, 1e-5)-DP of one example)."""
        from moe_router.privacy import released_statistics

        inputs = self.ws.on_device({k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
        noise = torch.Generator().manual_seed(derive_seed(self.terms.seed, "statistics", self.peer_id) % 2**63)
        with self.ws.bare_base():
            return released_statistics(self.ws.base, inputs, keys, self.terms.stats_epsilon, generator=noise)

    def _prompt_summary(self) -> Any:
        """Up to ``MAX_CENTROIDS`` centroids and the mean of its first ``CENTROID_PROMPTS`` training prompts' (the
        questions, not the answers: what the MoE routes on) mean-pooled input embeddings (the protocol's pool,
        ``moe_router.centroids.PROTOCOL_POOL``), on the bare base, with the terms' ``centroid_epsilon`` noise
        (``moe_router.centroids.PromptSummary``)."""
        from moe_router.centroids import MAX_CENTROIDS, PROTOCOL_POOL, summarize_prompts

        t, tok = self.terms, self.tokenizer
        contexts = [truncate_context(context_continuation_ids(tok, e.prompt, e.answer)[0], budget=t.max_len,
                                     n_special=n_special_prefix(tok)) for e in self.data.train[:CENTROID_PROMPTS]]  # fmt: skip
        batches = []
        for start in range(0, len(contexts), t.batch_size):
            chunk = contexts[start : start + t.batch_size]
            width = max(len(c) for c in chunk)
            batches.append(self.ws.on_device({
                "input_ids": torch.tensor([c + [tok.pad_token_id] * (width - len(c)) for c in chunk]),
                "attention_mask": torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in chunk]),
            }))  # fmt: skip
        noise = torch.Generator().manual_seed(derive_seed(t.seed, "centroids", self.peer_id) % 2**63)
        with self.ws.bare_base():
            summary = summarize_prompts(self.ws.base, batches, pool_layer=PROTOCOL_POOL, k=MAX_CENTROIDS, seed=t.seed,
                                        epsilon=t.centroid_epsilon, generator=noise)  # fmt: skip
        return summary

    def _plan(self) -> None:
        closing = self.collab.close_if_due(self.peer_id, now=time.time())
        if closing is None:
            self.waiting = True
            return
        statistics: dict[str, Any] = {}  # the members' task statistics, as read (the cluster topology's distances)
        computed = compute_plan(self.terms, closing.registrations, collab_commit=closing.commit,
                                problems=self._statistics_problems(closing, statistics),
                                statistics=statistics or None, signatures=self._signatures(closing))  # fmt: skip
        if self.peer_id in computed.get("excluded", {}):
            raise TermsError(f"peer {self.peer_id}: the plan of {self.collab.repo_id} excludes this member: "
                             f"{computed['excluded'][self.peer_id]}")  # fmt: skip
        self._check_own_registration(closing)
        try:
            committed: Any = self.collab.commit_plan(computed)  # a cache for readers: nobody is bound by it
        except TermsError as exc:  # an unreadable committed plan binds nobody either
            committed = str(exc)
        ignored = plan_differences(committed, computed)
        if ignored:
            logger.warning("peer %s: the plan committed to %s differs from the plan computed here (%s): ignored, "
                           "every member uses the plan it computes", self.peer_id, self.collab.repo_id,
                           "; ".join(ignored)[:500])  # fmt: skip
        tasks = {r.peer: r.task for r in closing.registrations}
        budgets = {r.peer: r.kept for r in closing.registrations if r.kept is not None}  # checked at round 0
        self._save(phase="calibrate", plan=computed, tasks=tasks, budgets=budgets,
                   committed_plan_ignored=ignored)  # fmt: skip

    def _check_own_registration(self, closing: Any) -> None:
        """Stop (one line) unless registration closed admitting this member's registration exactly as it wrote it
        (a registration changed by someone else, e.g. the collaboration's owner, is not this member's)."""
        own = next((r for r in closing.registrations if r.peer == self.peer_id), None)
        if own is None:
            raise self.collab.refusal(closing, self.peer_id)
        wrote = self.state.get("registration")
        if wrote is not None and own.to_dict() != wrote:
            differ = sorted(k for k in set(wrote) | set(own.to_dict()) if wrote.get(k) != own.to_dict().get(k))
            raise TermsError(
                f"peer {self.peer_id}: collaboration {self.collab.repo_id} closed at commit {closing.commit[:12]} with "
                f"a registration of this peer other than the one it wrote (fields {', '.join(differ)} differ): "
                "refusing to take part under it"
            )

    def _signatures(self, closing: Any) -> dict[str, tuple[torch.Tensor, int, float]] | None:
        """Every member's prompt signature (prompt mean, prompts, the noise sigma the terms' ``centroid_epsilon``
        puts on it), read at the closing commit, for the automatic cluster topology; None (the topology then uses
        the task statistics) unless the topology is automatic and every member registered a usable one."""
        if self.spec.final != "moe" or self.terms.spec.topology != "cluster" or self.terms.s_max is not None:
            return None
        from moe_router.centroids import PROTOCOL_POOL, pool_width
        from moe_router.privacy import DEFAULT_DELTA, gaussian_sigma

        from .publish import read_prompt_mean

        pool = PROTOCOL_POOL
        width = pool_width(self.ws.base, pool)
        eps = self.terms.centroid_epsilon
        out = {}
        for r in closing.registrations:
            try:
                mean, prompts = read_prompt_mean(self.hub, self.collab.repo_id, r.peer, revision=closing.commit,
                                                 pool_layer=pool, width=width)  # fmt: skip
            except TermsError as exc:
                logger.info("peer %s: clusters from the task statistics: %s", self.peer_id, exc)
                return None
            out[r.peer] = (mean, prompts, 0.0 if eps is None else gaussian_sigma(eps, DEFAULT_DELTA, 2.0 / prompts))
        return out

    def _statistics_problems(self, closing: Any, found: dict[str, Any] | None = None) -> dict[str, str]:
        """Members whose task statistics the implicit MoE could not use (missing, unreadable, not finite, other
        layers or shapes than the majority's), read at the closing commit: every member finds the same. The usable
        ones are put in ``found`` (peer -> statistics)."""
        if not self.spec.inter_cluster:
            return {}
        problems: dict[str, str] = {}
        shapes: dict[str, list] = {}
        for r in closing.registrations:
            try:
                stats = self.collab.member_stats(r.peer, revision=closing.commit)
            except (TermsError, EntryNotFound) as exc:
                problems[r.peer] = f"task statistics unusable: {str(exc)[:200]}"
                continue
            shapes[r.peer] = sorted((k, list(v.shape)) for k, v in stats.items())
            if found is not None:
                found[r.peer] = stats
        if shapes:
            layout = majority(sorted(shapes.items()))
            for peer, mine in shapes.items():
                if mine != layout:
                    problems[peer] = "task statistics with other layers or shapes than the majority of members'"
        if found is not None:
            for peer in problems:
                found.pop(peer, None)
        return problems

    def _calibrate(self) -> None:
        name = self.name_of(self.index)
        if not self.ws.has_adapter(name):
            self.ws.add_adapter(name, self.index)
        if self.kind.calibrates:
            self.ws.calibrate(name, self.batches(CALIBRATION))
        own = self.ws.own_state(name, round=0)
        self.structure = {self.index: own}
        self.view = {name: own}
        save_view(self.state_dir / STRUCTURES_FILE, {name: own})
        self.peer = self._hub_peer()
        self.peer.last_pushed_round()
        self._save(phase="train", round=0)

    def _train(self) -> None:
        r, name = self.state["round"], self.name_of(self.index)
        self.ws.load_view(self.view)
        forward = FORWARD_RULES[self.spec.forward].active(
            self.peer_id, self._cluster(), self.plan["neighbours"][self.peer_id]
        )
        active = [n for n in (self.name_of(self.index_of(q)) for q in forward) if n in self.view]
        if self.spec.cotrain_every and self.experts:  # co-training: the other clusters' experts, frozen
            frozen = {self.name_of(q): part for e in self.experts.values() for q, part in e.items()}
            self.ws.load_view(frozen)
            active += sorted(frozen)
        losses = self.ws.train(name, active, self.batches(r), lr=self.terms.lr)
        update = self.kind.values_only(self.ws.own_state(name, round=r))
        dropped = None
        if not _all_finite(losses, update):  # drop, never die: the view it trained from is suspect
            dropped = {"round": r, "action": "rejected", "peer": None, "layer": None,
                       "reason": f"training loss {float(np.mean(losses))} or update not finite: the round "
                                 f"{r - 1} view was dropped and the round retrained from the own update alone"}  # fmt: skip
            logger.warning("peer %s: %s", self.peer_id, dropped["reason"])
            self.view = {name: self._own_before(r)}
            self.ws.load_view(self.view)
            losses = self.ws.train(name, [name], self.batches(r), lr=self.terms.lr)
            update = self.kind.values_only(self.ws.own_state(name, round=r))
            if not _all_finite(losses, update):  # its own training diverges: push the untrained own part
                self.ws.load_view(self.view)
                update = self.kind.values_only(self.ws.own_state(name, round=r))
                losses = [float("nan")]
                dropped["reason"] += "; that diverged too: the untrained own part was pushed"
        loss = float(np.mean(losses))
        metrics = {"train_loss": loss} if np.isfinite(loss) else {}
        pushed = self.peer.push_round(r, update, metrics=metrics)
        self._own = update if pushed.created else self._own_from_hub(r)
        stats = self.kind.stats(self._own)
        records = [rec for rec in self.state["records"] if rec["round"] != r]
        records.append(
            {
                "round": r,
                "loss": loss if np.isfinite(loss) else None,
                "bytes_pushed": pushed.bytes,
                "params_transmitted": stats.params_transmitted,
                "params_updated": stats.params_updated,
                "value_bytes": stats.value_bytes,
                "decisions": [] if dropped is None else [dropped],
            }
        )
        self._crash_point(f"{self.peer_id}:pushed:{r}")
        self._save(phase="pull", records=records)

    def _own_before(self, round: int) -> Any:
        """The own update this member pushed before ``round`` (its round-0 structure at round 0), with structure."""
        own = self.structure[self.index]
        return own if round == 0 else self.kind.with_structure(self._own_from_hub(round - 1), own)

    def _poll(self, round: int, names: Sequence[str]) -> dict[str, Any] | None:
        """One non-blocking pass over ``names``' round-``round`` revisions; the result once all are in or the
        round timeout passed (then the missing ones are skipped), else None (waiting)."""
        key = (round, tuple(names))
        if self._pending is None or self._pending["key"] != key:
            banned = self.state.get("banned", {})  # members whose round 0 broke their registered budget
            self._pending = {"key": key, "updates": {}, "bytes": {}, "revisions": {}, "decisions": [],
                             "rejected": {n: banned[n] for n in names if n in banned},
                             "deadline": time.monotonic() + self.terms.round_timeout_s}  # fmt: skip
        p = self._pending
        missing = [n for n in names if n not in p["updates"] and n not in p["rejected"]]
        if missing:
            # one pass is not a skip yet: this program decides at the round timeout
            with dropping("sorlora_gossip.peer", "skipping neighbour"):
                pull = self.peer.pull_round(round, missing, timeout=0.0, poll_interval=0.0)
            for n, update in list(pull.updates.items()) if round == 0 else ():
                why = self._off_budget(n, update)
                if why is not None:  # every member checks the same pinned bytes: all reject it alike, for good
                    del pull.updates[n]
                    pull.rejected[n] = Rejection(peer=n, revision=pull.revisions.pop(n, None), reason=why)
                    self.state.setdefault("banned", {})[n] = why
                    logger.warning("peer %s: rejecting %s from now on: %s", self.peer_id, n, why)
            p["decisions"] += [{"round": round, "action": "rejected", "peer": n, "layer": None, "reason": e.reason}
                               for n, e in pull.equivocations.items()]  # fmt: skip
            if self.tensor_pool is not None:
                self.tensor_pool.share(pull.updates)
            p["updates"].update(pull.updates)
            # the Peer keeps its last pull for the record its next push carries (revisions, skips): the parsed
            # updates and peer.json infos in it are taken now, so it keeps only that record
            pull.updates.clear()
            pull.infos.clear()
            p["bytes"].update(pull.bytes)
            p["revisions"].update(pull.revisions)
            p["rejected"].update({k: str(v) for k, v in pull.rejected.items()})
            missing = [n for n in names if n not in p["updates"] and n not in p["rejected"]]
        absent = self.state.setdefault("absent", {})  # member -> the first round it missed since it was last seen
        gone = {n for n in missing if n in absent and not self._back(n, absent[n])}
        if len(gone) < len(missing) and time.monotonic() < p["deadline"]:
            self.waiting = True
            return None
        self._pending = None
        p["skipped"] = {
            n: f"{round_tag(round)} not there and nothing pushed since it missed {round_tag(absent[n])}: not waited for"
            if n in gone else f"{round_tag(round)} not pushed within {self.terms.round_timeout_s:g} s"
            for n in missing
        }  # fmt: skip
        for n, why in p["skipped"].items():
            logger.warning("peer %s: skipping %s in round %d: %s", self.peer_id, n, round, why)
            absent.setdefault(n, round)
        for n in p["updates"]:
            absent.pop(n, None)
        return p

    def _back(self, member: str, missed: int) -> bool:
        """Whether ``member``, which missed round ``missed``, has pushed it since (a restarted member catching up):
        then it is waited for again. A member that left, or was gone for good, costs the others one round
        timeout, not one per round."""
        try:
            self.hub.resolve(self.hub.repo_id(member), round_tag(missed))
        except HubError:  # not there (RepoNotFound, RevisionNotFound) or the hub cannot say: not back yet
            return False
        return True

    def _off_budget(self, peer: str, update: Any) -> str | None:
        """Why ``peer``'s round-0 payload breaks the layer budget it registered (the kept entries per layer the plan
        was made from), or None when it keeps exactly that budget (or registered none)."""
        budget = self.state.get("budgets", {}).get(peer)
        masks = getattr(update, "masks", None)
        if budget is None or masks is None:
            return None
        kept = {k: int(m.sum()) for k, m in masks.items()}
        if kept == budget:
            return None
        differ = sorted(set(kept) ^ set(budget)) or sorted(k for k in kept if kept[k] != budget[k])
        return (
            f"round-0 masks keep other entries than its registered budget (layer {differ[0]}: "
            f"{kept.get(differ[0])} kept vs {budget.get(differ[0])} registered; {len(differ)} layer(s) differ)"
        )

    def _pull_structures(self, names: Sequence[str]) -> dict[str, Any] | None:
        """Round-0 payloads (masks, shapes) of ``names`` not known yet; None while waiting."""
        unknown = [n for n in names if self.index_of(n) not in self.structure]
        if not unknown:
            return {"bytes": {}, "skipped": {}, "rejected": {}, "decisions": []}
        got = self._poll(0, unknown)
        if got is None:
            return None
        for n, update in got["updates"].items():
            self.structure[self.index_of(n)] = update
        save_view(self.state_dir / STRUCTURES_FILE,
                   {self.name_of(i): s for i, s in sorted(self.structure.items())})  # fmt: skip
        return got

    def _pull(self) -> None:
        r = self.state["round"]
        neighbours = self.plan["neighbours"][self.peer_id]
        got = self._poll(r, neighbours)
        if got is None:
            return
        if r > 0 and self._pull_structures(list(got["updates"])) is None:  # only after a restart: known otherwise
            return
        received = {self.index_of(n): u for n, u in got["updates"].items()
                    if r == 0 or self.index_of(n) in self.structure}  # fmt: skip
        if r == 0:
            for q, update in received.items():
                self.structure[q] = update
            save_view(self.state_dir / STRUCTURES_FILE,
                       {self.name_of(i): s for i, s in sorted(self.structure.items())})  # fmt: skip
        self.view, decisions = self._aggregate(received)
        save_view(view_path(self.state_dir, r), self.view)
        save_reference(reference_path(self.state_dir, r), self.reference)
        records = self.state["records"]
        records[-1].update(bytes_pulled=int(sum(got["bytes"].values())), used=dict(got["revisions"]),
                           skipped=got["skipped"], rejected=got["rejected"])  # fmt: skip
        records[-1]["decisions"] = [*(d for d in records[-1].get("decisions", []) if d.get("peer") is None),
                                    *got["decisions"], *decisions]  # fmt: skip
        last = r == self.terms.rounds - 1
        every = self.spec.cotrain_every or self.terms.inter_cluster_every
        exchange = self.spec.inter_cluster and (last or (every and (r + 1) % every == 0))
        self._crash_point(f"{self.peer_id}:pulled:{r}")
        if exchange:
            self._save(phase="exchange", records=records)
        elif last:
            self._save(phase="publish", records=records)
        else:
            self._save(phase="train", round=r + 1, records=records)

    def _aggregate(self, received: dict[int, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The new view from the own trained update and the neighbours' (method.md §3) and the robust strategy's
        decisions: the spec's aggregation rule (:data:`~sorlora.methods.rules.AGGREGATIONS`) gives this round's
        parts under the terms' ``aggregation`` strategy, measured from the last round's B̄ (:attr:`reference`,
        checkpointed); a view whose loss on the own calibration batch is not finite drops the most suspicious
        neighbour and is aggregated again. Under a forward rule that keeps the view, members skipped this round keep
        their earlier parts; rejected members' parts leave the view."""
        keeps = FORWARD_RULES[self.spec.forward].keeps_view
        combined = AGGREGATIONS[self.spec.aggregation](Group(
            me=self.index,
            own=self.kind.with_structure(self._own, self.structure[self.index]),
            received={q: self.kind.with_structure(u, self.structure[q]) for q, u in received.items()},
            weights={self.index_of(p): w for p, w in self.plan["weights"].items()},  # raw: never float() here
            cluster=[self.index_of(q) for q in self._cluster()],
            forward=self.spec.forward,
            shared_projection=self.kind.shared_projection,
            strategy=self.terms.aggregation,
            round=self.state["round"],
            reference=self.reference,
            names={self.index_of(p): p for p in self.plan["members"]},
            check=lambda parts: self._finite_view(self._compose(parts, keeps)),
        ))  # fmt: skip
        view = self._compose(combined.parts, keeps)
        for q in combined.rejected:
            if q not in combined.parts:
                view.pop(self.name_of(q), None)
        if combined.reference is not None:
            self.reference = combined.reference
        return view, combined.decisions

    def _compose(self, parts: dict[int, Any], keeps: bool) -> dict[str, Any]:
        view = dict(self.view) if keeps else {}
        view.update({self.name_of(q): part for q, part in parts.items()})
        return view

    def _finite_view(self, view: dict[str, Any]) -> bool:
        """Whether the loss of ``view`` (its forward rule's adapters) on the own calibration batch is finite."""
        if not hasattr(self, "_check_batch"):
            self._check_batch = self.batches(CALIBRATION)[0]
        self.ws.load_view(view)
        forward = FORWARD_RULES[self.spec.forward].active(
            self.peer_id, self._cluster(), self.plan["neighbours"][self.peer_id]
        )
        self.ws.activate([n for n in (self.name_of(self.index_of(q)) for q in forward) if n in view])
        with torch.no_grad():
            loss = answer_loss(self.ws.network, self.ws.on_device(self._check_batch))
        return bool(torch.isfinite(loss))

    def _exchange(self) -> None:
        """Pull every other cluster's members of this round and form their experts (never averaged in)."""
        r = self.state["round"]
        others = [q for c in self.plan["clusters"] if self.peer_id not in c for q in c]
        got = self._poll(r, others)
        if got is None:
            return
        structures = self._pull_structures(list(got["updates"]))  # pushed before round r: there already
        if structures is None:
            return
        experts: dict[int, dict[int, Any]] = {}
        decisions: list[dict[str, Any]] = []
        for c, members in enumerate(self.plan["clusters"]):
            if self.peer_id in members:
                continue
            have = [m for m in members if m in got["updates"] and self.index_of(m) in self.structure]
            if not have:
                continue
            ups = [self.kind.with_structure(got["updates"][m], self.structure[self.index_of(m)]) for m in have]
            parts, found = cluster_expert(ups, [self.plan["weights"][m] for m in have], strategy=self.terms.aggregation,
                                          names=have, round=r)  # fmt: skip
            decisions += found
            experts[c] = {self.index_of(m): part for m, part in zip(have, parts) if part is not None}
        decisions += got["decisions"]
        self.experts = experts
        save_view(experts_path(self.state_dir, r),
                   {f"{self.name_of(q)}": part for e in experts.values() for q, part in e.items()})  # fmt: skip
        exchanges = [e for e in self.state["exchanges"] if e["round"] != r]
        exchanges.append({"round": r, "bytes_pulled": int(sum(got["bytes"].values()) +
                                                          sum(structures["bytes"].values())),
                          "skipped": got["skipped"], "rejected": {**structures["rejected"], **got["rejected"]},
                          "decisions": decisions})  # fmt: skip
        last = r == self.terms.rounds - 1
        self._save(phase="publish" if last else "train", round=r if last else r + 1, exchanges=exchanges)

    # ------------------------------------------------------------------ publishing
    def _publish(self) -> None:
        """Publish the final adapter and what the final model needs (:mod:`sorlora.protocol.publish`)."""
        published = publish_final(self, crash_point=self._crash_point)
        if not published:
            self.waiting = True  # the collaboration's MoE is being published by the member that claimed it first
            return
        self._save(phase="done")

    def load_experts(self, round: int) -> None:
        """The other clusters' experts as the exchange after ``round`` saved them (none if it did not happen)."""
        path = experts_path(self.state_dir, round)
        if not path.exists():
            return
        loaded = load_view(path, self.kind.payload_cls)
        self.experts = {}
        for c, members in enumerate(self.plan["clusters"]):
            got = {self.index_of(m): loaded[self.name_of(self.index_of(m))] for m in members
                   if self.name_of(self.index_of(m)) in loaded}  # fmt: skip
            if got:
                self.experts[c] = got
