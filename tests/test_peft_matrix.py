"""PEFT's own custom-model test matrix (``tests/test_custom_models.py`` of the installed peft's sdist), run on SO-LoRA.

The upstream module is fetched with pip (see :mod:`tests.peft_upstream`), never copied here. Every upstream test
parametrized over ``TEST_CASES`` (one adapter) or ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` (two active adapters) runs
with the SO-LoRA cases below instead, as the other methods' cases would be written beside them: the MLP variants, the
transformers ``Conv1D`` model, both projections, both budget allocations, several calibration lengths, payload dtypes,
``modules_to_save`` (and random B initialisation for two active adapters). PEFT's other methods' cases are not collected. The masks are calibrated the way a user
would get them: automatically during the first training batches (PEFT's tests call neither ``calibrate`` nor
anything else of ours).
"""

from __future__ import annotations

import pytest

import peft_sorlora
from peft_sorlora import SOLoRAConfig

from .peft_upstream import matrix_class, upstream_module

upstream = upstream_module("test_custom_models")

_MLP = "MLP"
TEST_CASES = [
    ("Vanilla MLP 1 SO-LoRA", _MLP, SOLoRAConfig, {"r": 4, "target_modules": "lin0"}),
    ("Vanilla MLP 2 SO-LoRA", _MLP, SOLoRAConfig, {"r": 4, "target_modules": ["lin0"]}),
    ("Vanilla MLP 3 SO-LoRA", _MLP, SOLoRAConfig, {"r": 4, "target_modules": ["lin1"]}),
    ("Vanilla MLP 4 SO-LoRA", _MLP, SOLoRAConfig, {"r": 4, "target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 SO-LoRA", _MLP, SOLoRAConfig, {"r": 4, "target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    (
        "Vanilla MLP 6 SO-LoRA gaussian",
        _MLP,
        SOLoRAConfig,
        {"r": 4, "target_modules": ["lin0", "lin1"], "projection": "gaussian", "projection_seed": 7, "slot": 5},
    ),
    (
        "Vanilla MLP 7 SO-LoRA spectral_entropy",
        _MLP,
        SOLoRAConfig,
        {"r": 4, "target_modules": ["lin0", "lin1"], "sparsity": 0.3, "sparsity_allocation": "spectral_entropy"},
    ),
    (
        "Vanilla MLP 8 SO-LoRA gaussian spectral_entropy",
        _MLP,
        SOLoRAConfig,
        {
            "r": 2,
            "target_modules": ["lin0", "lin1"],
            "projection": "gaussian",
            "sparsity": 0.25,
            "sparsity_allocation": "spectral_entropy",
        },
    ),
    (
        "Vanilla MLP 9 SO-LoRA orthogonal slot 4",
        _MLP,
        SOLoRAConfig,
        {"r": 2, "target_modules": ["lin0", "lin1"], "slot": 4, "projection_seed": 3},
    ),
    ("Vanilla MLP 10 SO-LoRA dense", _MLP, SOLoRAConfig, {"r": 4, "target_modules": ["lin0", "lin1"], "sparsity": 1.0}),
    (
        "Vanilla MLP 11 SO-LoRA 2 calibration steps",
        _MLP,
        SOLoRAConfig,
        {"r": 4, "target_modules": ["lin0", "lin1"], "mask_calibration_steps": 2},
    ),
    (
        "Vanilla MLP 12 SO-LoRA dropout",
        _MLP,
        SOLoRAConfig,
        {"r": 4, "target_modules": ["lin0", "lin1"], "lora_dropout": 0.1},
    ),
    (
        "Vanilla MLP 13 SO-LoRA alpha 4 sparsity 0.1",
        _MLP,
        SOLoRAConfig,
        {"r": 2, "lora_alpha": 4, "target_modules": ["lin0", "lin1"], "sparsity": 0.1},
    ),
    (
        "Vanilla MLP 14 SO-LoRA payload bfloat16",
        _MLP,
        SOLoRAConfig,
        {"r": 4, "target_modules": ["lin0", "lin1"], "payload_dtype": "bfloat16"},
    ),
    (
        "Vanilla MLP 15 SO-LoRA payload float16 regex",
        _MLP,
        SOLoRAConfig,
        {"r": 4, "target_modules": r"lin\d", "payload_dtype": "float16"},
    ),
    ("Vanilla MLP2 1 SO-LoRA", "MLP2", SOLoRAConfig, {"r": 4, "target_modules": ["lin0", "lin1"]}),
    ("LayerNorm MLP 1 SO-LoRA", "MLP_LayerNorm", SOLoRAConfig, {"r": 4, "target_modules": ["lin0", "lin1"]}),
    ("Embedding + transformers Conv1D 1 SO-LoRA", "EmbConv1D", SOLoRAConfig, {"r": 2, "target_modules": ["conv1d"]}),
    (
        "Embedding + transformers Conv1D 2 SO-LoRA gaussian spectral_entropy",
        "EmbConv1D",
        SOLoRAConfig,
        {
            "r": 2,
            "target_modules": ["conv1d", "lin0"],
            "projection": "gaussian",
            "sparsity_allocation": "spectral_entropy",
        },
    ),
]

MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    (
        "SO-LoRA Same",
        "solora",
        SOLoRAConfig,
        {"r": 4, "target_modules": ["lin0"], "init_weights": False, "slot": 0},
        {"r": 4, "target_modules": ["lin0"], "init_weights": False, "slot": 1},
    ),
    (
        "SO-LoRA Different",
        "solora",
        SOLoRAConfig,
        {"r": 4, "target_modules": ["lin0"], "init_weights": False},
        {"r": 4, "target_modules": ["lin1"], "init_weights": False, "projection": "gaussian"},
    ),
]

assert peft_sorlora.SOLORA  # the method is registered before the upstream tests build configs

TestSOLoRACustomModel = matrix_class(
    "TestSOLoRACustomModel", upstream.TestPeftCustomModel, {id(upstream.TEST_CASES): TEST_CASES}
)
TestSOLoRAMultipleActiveAdapters = matrix_class(
    "TestSOLoRAMultipleActiveAdapters",
    upstream.TestMultipleActiveAdapters,
    {id(upstream.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES): MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES},
)


def test_the_matrix_fails_clearly_when_the_sdist_cannot_be_fetched(tmp_path, monkeypatch):
    from sorlora.data.sources import DataSourceError

    from .peft_upstream import _tests_root

    monkeypatch.setenv("SORLORA_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as offline as it gets: pip may not look anywhere
    with pytest.raises(DataSourceError, match=r"data source peft==0\.0\.0 could not be fetched .* by 'pip download'"):
        _tests_root("0.0.0")
    assert not (tmp_path / "empty-cache" / "peft-0.0.0-tests" / "peft_upstream_tests").exists()
