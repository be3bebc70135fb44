"""The method table is the one place a method is defined: every entry runs end to end (PEFT's
``test_custom_models.py`` shape: one tiny run per table entry), and a method added by one entry runs too."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from moe_router.configuration import REFINE_MODES
from sorlora.evaluation.final_models import FINAL_MODELS
from sorlora.methods.kinds import ADAPTER_KINDS
from sorlora.methods.rules import AGGREGATIONS, FORWARD_RULES
from sorlora.methods.specs import ALL_METHODS, EXTRA_METHODS, METHOD_SPECS, METHODS, method_names
from sorlora.protocol.plan import TOPOLOGIES
from sorlora.protocol.publish import PUBLISHERS
from sorlora.protocol.terms import CollabTerms
from sorlora.simulation.config import ExperimentConfig
from sorlora.simulation.engines import ENGINES
from sorlora.simulation.runner import run_experiment

from .test_simulation_runner import TINY

ONE_METHOD = TINY.replace(peers=2, rounds=1, local_steps=1, n_train=8, n_test=4, n_curve=2, n_validation=0)


def test_method_names_come_from_the_table():
    assert METHODS == tuple(n for n, s in METHOD_SPECS.items() if s.default)
    assert set(ALL_METHODS) == set(METHOD_SPECS) and ALL_METHODS == METHODS + EXTRA_METHODS
    assert ExperimentConfig().methods == METHODS
    assert set(ExperimentConfig().lr) == set(METHOD_SPECS)
    help_text = next(f for f in dataclasses.fields(CollabTerms) if f.name == "method").metadata["help"]
    assert all(m in help_text for m in METHOD_SPECS), "the terms' help names every method"


@pytest.mark.parametrize("name", sorted(METHOD_SPECS))
def test_every_entry_resolves_in_the_tables_it_names(name):
    spec = METHOD_SPECS[name]
    assert spec.name == name
    assert spec.kind is ADAPTER_KINDS[spec.kind_name]
    assert spec.topology in TOPOLOGIES and spec.aggregation in AGGREGATIONS and spec.forward in FORWARD_RULES
    assert spec.final in PUBLISHERS and spec.final in FINAL_MODELS


def test_settings_name_what_the_tables_hold():
    hints = typing.get_type_hints(ExperimentConfig)
    assert set(typing.get_args(hints["engine"])) == set(ENGINES)
    assert set(typing.get_args(hints["router_refine"])) == set(REFINE_MODES)


def _check_result(result, cfg):
    assert set(result["accuracy"]) == set(cfg.tasks)
    assert all(0.0 <= a <= 1.0 for a in result["accuracy"].values())
    assert len(result["curve"]) == cfg.rounds and len(result["train_loss"]) == cfg.rounds
    assert result["bytes_pushed"] > 0 and result["bytes_transmitted"] >= result["round_bytes"]


@pytest.mark.parametrize("name", sorted(METHOD_SPECS))
def test_every_method_of_the_table_runs_end_to_end(name, tmp_path):
    cfg = ONE_METHOD.replace(methods=(name,))
    summary = run_experiment(cfg, tmp_path, progress=False)
    _check_result(summary["methods"][name], cfg)
    assert (tmp_path / "results.md").is_file()


def test_a_method_added_by_one_table_entry_runs_end_to_end(tmp_path, monkeypatch):
    # a throwaway variant: solora-single's adapters, one cluster per task, members' parts never averaged
    variant = dataclasses.replace(METHOD_SPECS["solora-single"], name="throwaway", topology="task", aggregation="union")
    monkeypatch.setitem(METHOD_SPECS, "throwaway", variant)
    assert "throwaway" in method_names()
    cfg = ONE_METHOD.replace(peers=4, methods=("throwaway",), lr={**ONE_METHOD.lr, "throwaway": 3e-3})
    summary = run_experiment(cfg, tmp_path, progress=False)
    result = summary["methods"]["throwaway"]
    _check_result(result, cfg)
    assert sorted(map(sorted, result["clusters"])) == [[0, 2], [1, 3]], "one cluster per task, as the entry says"
