"""PEFT's own test modules, fetched from the installed peft's sdist and run against SO-LoRA cases.

The upstream tests are not copied into this repository: ``pip download --no-binary :all: peft==<installed>`` fetches
the sdist once into the project's data cache (``$SORLORA_CACHE`` or ``~/.cache/peft-sorlora``, like the BIG-bench
data, see :func:`sorlora.data.sources.fetch_distribution`) and its ``tests/*.py`` are extracted next to it as the
package ``peft_upstream_tests``. After the first fetch this works offline; when the fetch is impossible, importing
fails with the pip error (the matrix never silently disappears).

:func:`matrix_class` turns an upstream test class into one whose matrix tests are parametrized with our cases only:
each test parametrized over an upstream case list (e.g. ``TEST_CASES``) gets the SO-LoRA list instead, every other
test of the class is left out (those exercise other PEFT methods by name).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import sys
import tarfile
import types
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from sorlora.data.sources import cache_dir, fetch_distribution

__all__ = ["upstream_module", "matrix_class"]

PACKAGE = "peft_upstream_tests"
# Imported at module level by PEFT's testing helpers but used only by tests of other domains (Stable Diffusion,
# dataset-driven GPU examples) that the SO-LoRA matrix never collects.
_UNUSED_IMPORTS = {"diffusers": ("StableDiffusionPipeline",), "datasets": ("load_dataset",)}


def _tests_root(version: str) -> Path:
    """``<cache>/peft-<version>-tests``, holding ``peft_upstream_tests/`` extracted from the sdist (once)."""
    cache = cache_dir()
    root = cache / f"peft-{version}-tests"
    package = root / PACKAGE
    with FileLock(str(cache / f".peft-{version}-tests.lock")):
        if (package / "__init__.py").is_file():
            return root
        archive = fetch_distribution(f"peft=={version}", cache=cache, sdist=True)
        prefix = f"peft-{version}/tests/"
        staging = root / f".{PACKAGE}.partial"
        staging.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix)]
            names = [m.name[len(prefix) :] for m in members]
            if "test_custom_models.py" not in names:
                raise RuntimeError(f"{archive} holds no tests/test_custom_models.py")
            for member, name in zip(members, names):
                if "/" in name or not name.endswith(".py"):  # flat python files only (no data, no traversal)
                    continue
                (staging / name).write_bytes(tar.extractfile(member).read())
        (staging / "__init__.py").write_text(f'"""PEFT {version} tests, extracted from its sdist."""\n')
        staging.rename(package)
    return root


@contextlib.contextmanager
def _unused_imports_stubbed():
    """Stand-ins for the uninstalled modules while the upstream files import, removed again afterwards (so that
    ``importlib.util.find_spec`` checks elsewhere, e.g. transformers' ``is_datasets_available``, see no fake)."""
    added = []
    for name, attributes in _UNUSED_IMPORTS.items():
        try:
            importlib.import_module(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.__doc__ = f"stand-in for the uninstalled {name!r}: the SO-LoRA matrix never uses it"
            for attribute in attributes:
                setattr(stub, attribute, None)
            sys.modules[name] = stub
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def upstream_module(name: str) -> types.ModuleType:
    """Import ``tests/<name>.py`` of the installed peft's sdist (fetched and extracted on first use)."""
    version = importlib.metadata.version("peft")
    root = _tests_root(version)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    with _unused_imports_stubbed():
        return importlib.import_module(f"{PACKAGE}.{name}")


def _copy(function: types.FunctionType, marks: list[Any]) -> types.FunctionType:
    clone = types.FunctionType(
        function.__code__, function.__globals__, function.__name__, function.__defaults__, function.__closure__
    )
    clone.__kwdefaults__ = function.__kwdefaults__
    clone.__dict__.update(function.__dict__)
    clone.__qualname__ = function.__qualname__
    clone.pytestmark = marks
    return clone


def matrix_class(name: str, upstream: type, replacements: dict[int, list[tuple]]) -> type:
    """A subclass of ``upstream`` whose tests parametrized over an upstream case list run our cases instead.

    ``replacements`` maps ``id(upstream_list)`` to our list of cases (same tuple layout). Tests parametrized over
    none of those lists are hidden (set to None in the subclass, so pytest does not collect them).
    """
    namespace: dict[str, Any] = {"__doc__": f"PEFT's {upstream.__name__} matrix, SO-LoRA cases only."}
    for attribute in dir(upstream):
        if not attribute.startswith("test"):
            continue
        function = getattr(upstream, attribute)
        marks = list(getattr(function, "pytestmark", []))
        replaced = False
        for i, mark in enumerate(marks):
            if mark.name == "parametrize" and len(mark.args) >= 2 and id(mark.args[1]) in replacements:
                cases = replacements[id(mark.args[1])]
                ids = [case[0] for case in cases]
                marks[i] = pytest.mark.parametrize(mark.args[0], cases, ids=ids).mark
                replaced = True
        namespace[attribute] = _copy(function, marks) if replaced else None
    return type(name, (upstream,), namespace)
