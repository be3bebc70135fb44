"""The in-process engine: every peer program in this process around one shared base model, stepped in turn."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from ...protocol.program import PeerData, PeerProgram
from ...protocol.terms import CollabTerms
from ...runtime.sharing import TensorPool
from ...runtime.workspace import Workspace
from .base import PeerLaunch

__all__ = ["InProcessEngine"]


class InProcessEngine:
    """All programs in this process around one base model, stepped in turn until every one is done."""

    def __init__(self, *, base: Any, tokenizer: Any, progress: bool = True, poll_interval: float = 0.05) -> None:
        self.base, self.tokenizer = base, tokenizer
        self.progress, self.poll_interval = progress, poll_interval
        self._workspaces: dict[str, Workspace] = {}
        self.tensor_pool = TensorPool()  # one copy of the equal tensors the programs hold

    def workspace(self, terms: CollabTerms) -> tuple[Workspace, Any]:
        """The workspace shared by every program of one collaboration (one per terms)."""
        key = terms.sha256()
        if key not in self._workspaces:
            self._workspaces[key] = Workspace(self.base, terms.base_model, terms, terms.spec.kind)
        return self._workspaces[key], self.tokenizer

    def programs(self, hub: Any, collab_id: str, launches: Sequence[PeerLaunch]) -> list[PeerProgram]:
        """One program per launch, all on this engine's shared workspace."""
        return [
            PeerProgram(hub=hub, collab_id=collab_id, peer_id=launch.peer_id,
                        data=PeerData(task=launch.task, train=launch.train), state_dir=launch.state_dir,
                        workspace=self.workspace, position_mm=launch.position_mm, tensor_pool=self.tensor_pool)
            for launch in launches
        ]  # fmt: skip

    def drive(self, programs: Sequence[PeerProgram], *, desc: str = "peers") -> None:
        """Step ``programs`` in turn until every one is done (sleeping ``poll_interval`` when none progressed)."""
        with tqdm(total=len(programs), desc=desc, disable=not self.progress, leave=False) as bar:
            while True:
                live = [p for p in programs if not p.done]
                if not live:
                    break
                progressed = False
                for program in live:
                    program.step()
                    progressed = progressed or not program.waiting
                    bar.set_postfix(phase=program.phase, round=program.state["round"])
                bar.n = sum(p.done for p in programs)
                bar.refresh()
                if not progressed:
                    time.sleep(self.poll_interval)

    def run(self, hub: Any, collab_id: str, launches: Sequence[PeerLaunch], *, desc: str = "peers") -> None:
        """Run every launch's program to the end, then give the base model back clean."""
        try:
            self.drive(self.programs(hub, collab_id, launches), desc=desc)
        finally:
            self.release()

    def release(self) -> None:
        """Drop the collaboration's adapters; the base model is given back clean."""
        for ws in self._workspaces.values():
            self.base = ws.release()
        self._workspaces.clear()
