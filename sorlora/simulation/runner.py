"""The simulation: for every method, a collaboration of N peers on a hub, then an evaluation of what they published.

For every method (sorlora/methods/specs.py) the runner writes the collaboration's terms to the hub, launches N peers
on an engine (sorlora/simulation/engines/: in this process around one shared base model, as OS processes, or as Ray
actors) and waits. The peers do everything else themselves, exactly as devices would (sorlora/protocol/program.py): register,
agree on the plan by determinism, calibrate, train and exchange through the hub, exchange between clusters,
publish. The evaluator (sorlora/evaluation/readback.py) then reads back from the hub what the peers published (plan,
final adapters, implicit MoE, their reports) and evaluates it on every task's test split. It computes no topology and moves no data itself.
A killed run continues where it stopped (each peer resumes from its state directory and its revisions on the hub)
and yields the same table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from peft_sorlora.base_model import base_fingerprint
from sorlora_gossip import Hub
from sorlora_gossip.wireless import place_peers

from ..atomic import write_json
from ..data.examples import Task
from ..evaluation.readback import ReadBack
from ..evaluation.report import write_report
from ..methods.specs import METHOD_SPECS
from ..protocol.collab import create_collaboration
from ..runtime.workspace import adapter_name
from .config import ExperimentConfig
from .engines import make_engine
from .engines.base import PeerLaunch
from .setup import (
    check_run_dir_settings,
    collab_id,
    load_model,
    load_tasks,
    open_run_hub,
    peer_repo,
    resolve_device,
    task_shards,
    terms_for,
)

__all__ = ["Runner", "run_experiment"]


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
        create_collaboration(self.hub, collab_id(self.cfg, method), terms, exist_ok=True)
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
        engine.run(self.hub, collab_id(self.cfg, method), launches, desc=f"{method}: peers")
        readback = ReadBack(hub=self.hub, base=self.base, base_id=self.base_id, tokenizer=self.tokenizer,
                            tasks=self.tasks, eval_kw=self.cfg.eval_kwargs(), n_curve=self.cfg.n_curve,
                            validate=self.cfg.n_validation > 0, dealt=self.cfg.score_members == "dealt",
                            seed=self.cfg.seed, progress=self.progress)  # fmt: skip
        try:
            result = readback.evaluate_method(spec, terms, collab_id(self.cfg, method), mdir)
        finally:
            self.base = readback.base
        result["seconds"] = time.perf_counter() - started
        write_json(final_path, result)
        return result


def run_experiment(cfg: ExperimentConfig, run_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume) the simulation described by ``cfg`` in ``run_dir``; returns the results summary."""
    return Runner(cfg, run_dir, **kwargs).run()
