"""One copy of each equal tensor among the peer programs stepped in one process (the in-process simulation).

Programs in one process pull the same revisions of the same members and compute the same cluster views and
experts from them; each parsing or computing its own copy made memory grow with the square of the number of peers
(every program held every member's round-0 structure). A :class:`TensorPool` keeps one tensor per content
(entry name, dtype, shape, digest of the bytes) and replaces equal tensors in the programs' payloads by it, in place.
It holds its tensors weakly: a tensor no program holds any longer is freed as before.

Payload tensors are never modified in place (training writes the workspace's own parameters, aggregation makes new
tensors), so sharing them is safe; parameters and tensors that require grad are never pooled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import weakref
from typing import Any

import torch

__all__ = ["TensorPool"]


class TensorPool:
    """Canonical tensors by content, held weakly (see the module docstring)."""

    def __init__(self) -> None:
        self._by_key: weakref.WeakValueDictionary[tuple, torch.Tensor] = weakref.WeakValueDictionary()
        self._canonical: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()  # by id

    def __len__(self) -> int:
        return len(self._by_key)

    def tensor(self, t: torch.Tensor, *, label: object = None) -> torch.Tensor:
        """The pool's tensor equal to ``t`` held under ``label`` (``t`` itself the first time its content is seen).

        The label (a payload's layer key) keeps equal tensors of different entries apart, so that no payload ever
        holds one storage twice (safetensors refuses to save that)."""
        if (
            self._canonical.get(id(t)) is t
            or t.requires_grad
            or isinstance(t, torch.nn.Parameter)
            or t.device.type != "cpu"
        ):
            return t
        flat = t.detach().contiguous().reshape(-1)
        digest = hashlib.blake2b(flat.view(torch.uint8).numpy().data, digest_size=16).digest() if flat.numel() else b""
        key = (label, t.dtype, tuple(t.shape), digest)
        found = self._by_key.get(key)
        if found is not None:
            return found
        self._by_key[key] = t
        self._canonical[id(t)] = t
        return t

    def share(self, *objects: Any) -> None:
        """Replace, in place, the tensors held in ``objects`` (dicts and lists, nested, and the dict or list fields
        of dataclasses such as the payloads) by the pool's equal ones."""
        for obj in objects:
            self._share(obj, depth=0)

    def _share(self, obj: Any, depth: int) -> None:
        if depth > 8 or obj is None or isinstance(obj, (str, bytes, int, float, bool, torch.Tensor)):
            return
        if isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(v, torch.Tensor):
                    obj[k] = self.tensor(v, label=k)
                else:
                    self._share(v, depth + 1)
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                if isinstance(v, torch.Tensor):
                    obj[i] = self.tensor(v, label=i)
                else:
                    self._share(v, depth + 1)
        elif isinstance(obj, tuple):
            for v in obj:
                self._share(v, depth + 1)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name, None)
                if isinstance(value, (dict, list, tuple)) or dataclasses.is_dataclass(value):
                    self._share(value, depth + 1)
