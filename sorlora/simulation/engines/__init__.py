"""The engines that run a collaboration's device programs, one entry per engine in :data:`ENGINES`.

``local``: every program in this process around one shared base model (:mod:`.local`); ``processes``: every peer a
``sorlora peer`` OS process (:mod:`.processes`); ``ray``: every peer a Ray actor running its program (:mod:`.ray`).
Each entry builds its engine from the runner's keyword arguments and imports its module only then (the Ray extra
is optional). An engine only starts peers and waits for them (:class:`~.base.Engine`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["ENGINES", "make_engine"]


def _local(**kw: Any) -> Any:
    from .local import InProcessEngine  # noqa: PLC0415 - each engine's module is imported when it is chosen

    return InProcessEngine(**{k: kw[k] for k in ("base", "tokenizer", "progress")})


def _processes(**kw: Any) -> Any:
    from .processes import ProcessEngine  # noqa: PLC0415

    return ProcessEngine(**{k: kw[k] for k in ("hub_location", "model", "threads", "progress") if k in kw})


def _ray(**kw: Any) -> Any:
    from .ray import RayEngine  # noqa: PLC0415 - optional extra: fails with a clear message without ray

    return RayEngine(**{k: kw[k] for k in ("hub_location", "model", "threads", "progress", "cfg")})


ENGINES: dict[str, Callable[..., Any]] = {"local": _local, "processes": _processes, "ray": _ray}


def make_engine(name: str, **kwargs: Any) -> Any:
    """The engine ``name`` (a key of :data:`ENGINES`) with its settings."""
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {tuple(ENGINES)}, got {name!r}")
    return ENGINES[name](**kwargs)
