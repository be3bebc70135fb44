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
        self._payloads: weakref.WeakValueDictionary[tuple, Any] = weakref.WeakValueDictionary()

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
        of dataclasses such as the payloads) by the pool's equal ones, and the payloads held in dicts and lists
        by the pool's equal ones (same type, same pooled tensors, equal other fields)."""
        for obj in objects:
            self._share(obj, depth=0)

    def payload(self, obj: Any) -> Any:
        """The pool's dataclass equal to ``obj`` once its tensors are pooled (``obj`` itself when first seen or
        when a field is not hashable as compared here)."""
        self._share(obj, depth=0)
        try:
            key = ("payload", type(obj), *(_field_key(getattr(obj, f.name)) for f in dataclasses.fields(obj)))
            hash(key)
        except TypeError:
            return obj
        found = self._payloads.get(key)
        if found is not None:
            return found
        try:
            self._payloads[key] = obj
        except TypeError:  # not weakly referable (slots): not pooled
            return obj
        return obj

    def _share(self, obj: Any, depth: int) -> None:
        if depth > 8 or obj is None or isinstance(obj, (str, bytes, int, float, bool, torch.Tensor)):
            return
        if isinstance(obj, (dict, list)):
            for k, v in list(obj.items() if isinstance(obj, dict) else enumerate(obj)):
                if isinstance(v, torch.Tensor):
                    obj[k] = self.tensor(v, label=k)
                elif dataclasses.is_dataclass(v) and not isinstance(v, type):
                    obj[k] = self.payload(v)
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


def _field_key(value: Any) -> Any:
    """A hashable stand-in for a payload field: pooled tensors by identity, containers by their items."""
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _field_key(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_field_key(v) for v in value))
    return value
