"""Shared benchmark machinery: timing (warm-up + repeats, median/min/max), memory, result rows, machine description.

Every entry module exposes ``run(repeats: int = 5, quick: bool = False) -> list[dict]`` returning rows made by
:func:`rows_against`: each figure next to its anchor measured in the same run, as a ratio ``value / anchor median``.
All figures are "lower is better" (seconds, bytes, memory), so a ratio above 1 means worse than the anchor and the
row must carry a note saying why.
"""

from __future__ import annotations

import copy
import ctypes
import datetime as _dt
import functools
import gc
import os
import platform
import random
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

__all__ = [
    "SEED",
    "Measure",
    "PeakRSS",
    "measure_interleaved",
    "measure",
    "constant",
    "rows_against",
    "rss_bytes",
    "release_free_memory",
    "seed_everything",
    "machine_info",
    "smollm2",
    "tiny_llama",
    "token_batch",
]

SEED = 0
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Measure:
    """Repeated measurements of one figure (after warm-up) and their median/min/max."""

    samples: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("a Measure needs at least one sample")

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples))

    @property
    def min(self) -> float:
        return float(min(self.samples))

    @property
    def max(self) -> float:
        return float(max(self.samples))

    def scaled(self, factor: float) -> Measure:
        """The same samples times ``factor`` (e.g. seconds per batch -> seconds per token)."""
        return Measure(tuple(s * factor for s in self.samples))


def constant(value: float) -> Measure:
    """A deterministic figure (e.g. a byte count): one sample, median = min = max."""
    return Measure((float(value),))


def measure_interleaved(
    fns: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 1
) -> dict[str, Measure]:
    """Seconds per call of each function; after ``warmup`` calls each, they take turns in every repeat, so that
    drifts in machine load hit all alike (the anchor and the figure are measured side by side)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not fns:
        raise ValueError("nothing to measure")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: Measure(tuple(s)) for name, s in samples.items()}


def measure(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> Measure:
    """Seconds per call of ``fn`` after ``warmup`` calls: ``repeats`` samples."""
    return measure_interleaved({"fn": fn}, repeats=repeats, warmup=warmup)["fn"]


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc/self/statm``; falls back to the peak RSS)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``), so that the RSS growth
    of the next block measures what it allocates rather than what earlier blocks left cached."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS deltas then under-count reused memory
        pass


class PeakRSS:
    """Context manager sampling this process's RSS every ``interval`` s in a thread: ``peak - baseline`` bytes.

    On CPU torch has no allocator statistics and tracemalloc does not see its buffers, so the resident set is the
    measure; ``ru_maxrss`` is process-wide and monotone, hence the sampler. Freed memory is trimmed on entry.
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def delta(self) -> int:
        """Peak RSS during the block above the RSS at its start, in bytes."""
        return max(0, self.peak - self.baseline)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        release_free_memory()
        self.baseline = self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def rows_against(
    entry: str,
    figures: Mapping[str, Measure],
    *,
    anchor: str,
    unit: str,
    anchor_label: str | None = None,
    notes: Mapping[str, str] | None = None,
    worse_notes: Mapping[str, str] | None = None,
    params: Mapping[str, object] | None = None,
    group: str | None = None,
) -> list[dict]:
    """Result rows for one comparison: every figure with its ratio to the median of ``figures[anchor]``.

    Row keys: entry, group, name, anchor, anchor_label, median, min, max, unit, samples, ratio, ratio_of_min (the
    best runs compared: least disturbed by other load on the machine), worse, note, params.
    ``worse`` is True when the ratio exceeds 1 (every figure is lower-is-better); such a row's note is
    ``worse_notes[name]`` (why it is worse), any other row's ``notes[name]``.
    """
    if anchor not in figures:
        raise ValueError(f"anchor {anchor!r} is not among the figures {sorted(figures)}")
    base, base_min = figures[anchor].median, figures[anchor].min
    notes, worse_notes = notes or {}, worse_notes or {}
    rows = []
    for name, m in figures.items():
        ratio = m.median / base if base else float("nan")
        worse = name != anchor and ratio > 1.0
        note = (worse_notes.get(name) if worse else None) or notes.get(name, "")
        rows.append(
            {
                "entry": entry,
                "group": group or entry,
                "name": name,
                "anchor": anchor,
                "is_anchor": name == anchor,
                "anchor_label": anchor_label or anchor,
                "median": m.median,
                "min": m.min,
                "max": m.max,
                "unit": unit,
                "samples": list(m.samples),
                "ratio": ratio,
                "ratio_of_min": m.min / base_min if base_min else float("nan"),
                "worse": worse,
                "note": note,
                "params": dict(params or {}),
            }
        )
    return rows


def seed_everything(seed: int = SEED) -> None:
    """Seed Python, torch (and numpy if present) so that every run draws the same models and inputs."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np  # noqa: PLC0415

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy is a dependency here
        pass


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "benchmarks", "peft_sorlora", "sorlora_gossip", "moe_router"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(*, seed: int = SEED, argv: list[str] | None = None) -> dict[str, object]:
    """What the figures were measured on and how to reproduce them: CPU, cores, RAM, threads, library versions,
    git commit, seed, date and the exact command."""
    argv = sys.argv if argv is None else argv
    command = "python -m benchmarks" + ("" if len(argv) <= 1 else " " + shlex.join(argv[1:]))
    return {
        "date": _dt.date.today().isoformat(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "seed": seed,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "ram_gib": round(_ram_bytes() / 2**30, 1) if _ram_bytes() else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            d: _version(d) for d in ("torch", "transformers", "peft", "huggingface_hub", "safetensors", "peft-sorlora")
        },
        "git_commit": _git_commit(),
    }


@functools.cache
def _smollm2_cached() -> tuple[torch.nn.Module, str]:
    from peft_sorlora.base_model import load_base_model  # noqa: PLC0415 - heavy, only when the real model is used

    model, _ = load_base_model()
    return model, model.name_or_path


def smollm2() -> tuple[torch.nn.Module, str]:
    """A fresh copy of the bundled SmolLM2-135M-Instruct (loaded once per process, ~15 s) and its Hub id."""
    model, base_id = _smollm2_cached()
    return copy.deepcopy(model), base_id


def tiny_llama(seed: int = SEED) -> torch.nn.Module:
    """A tiny random Llama (hidden 256, 4 layers): the same code paths as SmolLM2 in milliseconds."""
    from sorlora.runtime.model_loading import tiny_random_model  # noqa: PLC0415

    model, _ = tiny_random_model(hidden_size=256, num_hidden_layers=4, seed=seed)
    return model


def token_batch(model: torch.nn.Module, batch: int, length: int, *, seed: int = SEED) -> dict[str, torch.Tensor]:
    """A random token batch (input_ids = labels) of ``batch x length`` for ``model``'s vocabulary."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}
