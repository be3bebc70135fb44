"""Atomic file writes: the one place a file is written so that a crash never leaves half of it behind."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["write_bytes", "write_json"]


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a ``.tmp`` sibling and an atomic rename; returns the path."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike[str], data: Any, *, sort_keys: bool = False) -> Path:
    """Write ``data`` as indented JSON, atomically (see :func:`write_bytes`)."""
    return write_bytes(path, json.dumps(data, indent=1, sort_keys=sort_keys).encode())
