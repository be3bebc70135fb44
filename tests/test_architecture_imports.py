"""The import graph of the whole repository (read from the source with ``ast``, function-level and
``TYPE_CHECKING`` imports included): no circle between any two modules, and nothing reaches up a declared layer."""

from __future__ import annotations

from .import_graph import PACKAGES, cycles, import_graph, project_modules

# The packages, bottom up: a package imports only packages of a lower layer.
PACKAGE_LAYERS = {"model_cards": 0, "peft_sorlora": 1, "moe_router": 2, "sorlora_gossip": 2, "sorlora": 3}

# The application's parts, bottom up (README: a device program, run by engines, read back by an evaluator). A
# module imports only its own part or a lower layer: the protocol never imports the evaluator or the simulation,
# data and runtime never import the simulation's settings.
SORLORA_LAYERS = {
    "sorlora": 0,  # the package itself (sets OMP_WAIT_POLICY)
    "sorlora.atomic": 0,
    "sorlora.fields": 0,
    "sorlora.logs": 0,
    "sorlora.data": 0,
    "sorlora.methods": 0,
    "sorlora.runtime": 1,
    "sorlora.protocol": 2,
    "sorlora.evaluation": 3,
    "sorlora.simulation": 4,
    "sorlora.study": 5,
    "sorlora.cli": 6,
    "sorlora.__main__": 7,
}

# Circles allowed, each with why it is there; an entry that is no longer a circle fails the test, so the list only
# shrinks. None today.
KNOWN_CIRCLES: list[list[str]] = []


def _part(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def test_the_graph_covers_every_package():
    modules = project_modules()
    assert {m.split(".")[0] for m in modules} == set(PACKAGES)
    assert len(modules) > 80
    graph = import_graph()
    assert "sorlora.protocol.terms" in graph["sorlora.protocol.program"], "relative imports are resolved"
    assert "sorlora.simulation.engines.ray" in graph["sorlora.simulation.engines"], "function-level imports count"


def test_no_import_circle_anywhere():
    found = cycles(import_graph())
    assert sorted(found) == sorted(KNOWN_CIRCLES), f"import circles: {[c for c in found if c not in KNOWN_CIRCLES]}"


def test_packages_import_only_lower_layers():
    wrong = [
        f"{m} -> {d}"
        for m, deps in import_graph().items()
        for d in deps
        if m.split(".")[0] != d.split(".")[0] and PACKAGE_LAYERS[d.split(".")[0]] >= PACKAGE_LAYERS[m.split(".")[0]]
    ]
    assert not wrong, "imports reaching up or sideways between packages: " + "; ".join(wrong)


def test_application_parts_import_only_lower_layers():
    graph = import_graph()
    parts = {_part(m) for m in graph if m.startswith("sorlora.") or m == "sorlora"}
    assert parts <= set(SORLORA_LAYERS), f"a part without a declared layer: {sorted(parts - set(SORLORA_LAYERS))}"
    wrong = []
    for m, deps in graph.items():
        if _part(m) not in SORLORA_LAYERS:
            continue
        for d in deps:
            if _part(d) in SORLORA_LAYERS and _part(d) != _part(m):
                if SORLORA_LAYERS[_part(d)] >= SORLORA_LAYERS[_part(m)]:
                    wrong.append(f"{m} -> {d} (line {graph[m][d]})")
    assert not wrong, "imports reaching up or sideways: " + "; ".join(wrong)


def test_the_check_finds_a_circle_and_an_upward_import():
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []
