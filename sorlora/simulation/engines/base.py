"""What every engine shares: the peer it starts (:class:`PeerLaunch`) and the interface it offers (:class:`Engine`).

An engine only starts peers and waits for them: peers find each other, agree on the plan and exchange everything
through the hub. Engines import nothing of the runner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ...data.examples import Example

__all__ = ["Engine", "PeerLaunch"]


@dataclass(frozen=True)
class PeerLaunch:
    """One peer to start: its repo id, its own data, its position estimate and its local state directory."""

    peer_id: str
    task: str
    train: Sequence[Example]
    state_dir: Path
    position_mm: tuple[int, int] | None = None


class Engine(Protocol):
    """Runs one collaboration's peers (each a :class:`~sorlora.protocol.program.PeerProgram`) to the end."""

    def run(self, hub: Any, collab_id: str, launches: Sequence[PeerLaunch], *, desc: str = "peers") -> None:
        """Start a program per launch and return once every one is done (raise if one failed)."""
        ...
