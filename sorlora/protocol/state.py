"""A peer program's checkpoint on the device: ``state.json`` and the views, structures and experts it saved.

Everything a program needs to resume after being killed at any point lies in its state directory:
``state.json`` (phase, round, records, plan), ``structures.safetensors`` (the members' round-0 payloads it knows),
``view-<round>.safetensors`` (its view after each round), ``reference-<round>.safetensors`` (the dense B̄ of that
round's robust aggregation: what the next round's updates are measured from) and ``experts-<round>.safetensors``
(the other clusters' experts of an exchange). Payloads are stored as their own wire bytes, one uint8 tensor per adapter name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from ..atomic import write_bytes, write_json

__all__ = [
    "STATE_FILE",
    "STRUCTURES_FILE",
    "experts_path",
    "load_reference",
    "load_view",
    "read_state",
    "reference_path",
    "save_reference",
    "save_view",
    "view_path",
    "write_state",
]

STATE_FILE = "state.json"
STRUCTURES_FILE = "structures.safetensors"


def view_path(state_dir: Path, round: int) -> Path:
    """The view a program held after ``round``."""
    return Path(state_dir) / f"view-{round:04d}.safetensors"


def experts_path(state_dir: Path, round: int) -> Path:
    """The other clusters' experts a program formed in the exchange after ``round``."""
    return Path(state_dir) / f"experts-{round:04d}.safetensors"


def reference_path(state_dir: Path, round: int) -> Path:
    """The dense B̄ (layer -> tensor) of a program's aggregation in ``round``."""
    return Path(state_dir) / f"reference-{round:04d}.safetensors"


def save_reference(path: Path, reference: dict[str, torch.Tensor] | None) -> None:
    """Save a reference B̄ (nothing for None), atomically."""
    if reference is not None:
        write_bytes(path, save_safetensors({k: v.detach().contiguous().cpu() for k, v in sorted(reference.items())}))


def load_reference(path: Path) -> dict[str, torch.Tensor] | None:
    """A reference saved by :func:`save_reference`, or None when there is none."""
    return dict(load_file(str(path))) if Path(path).exists() else None


def save_view(path: Path, view: dict[str, Any]) -> None:
    """Save ``view`` (adapter name -> payload), atomically."""
    tensors = {name: torch.frombuffer(bytearray(state.to_bytes()), dtype=torch.uint8) for name, state in view.items()}
    write_bytes(path, save_safetensors(tensors))


def load_view(path: Path, payload_cls: type) -> dict[str, Any]:
    """A view saved by :func:`save_view`, its payloads parsed by ``payload_cls`` (in adapter-name order)."""
    return {n: payload_cls.from_bytes(bytes(t.numpy())) for n, t in sorted(load_file(str(path)).items())}


def read_state(state_dir: Path) -> dict[str, Any] | None:
    """The saved ``state.json`` of a program, or None before its first save."""
    path = Path(state_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_state(state_dir: Path, state: dict[str, Any]) -> None:
    """Save a program's state, atomically."""
    write_json(Path(state_dir) / STATE_FILE, state, sort_keys=True)
