"""The benchmark suite runs end to end (quick mode) and reports ratios to anchors; no timing is asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import ENTRIES, OPTIONAL, markdown_table, normalize_row, run_entry
from benchmarks.common import Measure, constant, machine_info, measure_interleaved, rows_against

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--repeats", "1", "--output-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, out


def test_quick_run_writes_json_and_markdown_with_ratios(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = out.glob("*-quick.json")
    (md_path,) = out.glob("*-quick.md")
    report = json.loads(json_path.read_text())
    machine = report["machine"]
    for key in ("cpu", "cores", "ram_gib", "versions", "git_commit", "seed", "command", "date"):
        assert machine[key] not in (None, ""), key
    assert machine["command"].startswith("python -m benchmarks --quick")
    assert {"torch", "transformers", "peft", "huggingface_hub"} <= {k for k, v in machine["versions"].items() if v}
    results = {r["entry"]: r for r in report["results"]}
    assert list(results) == ENTRIES
    for name in set(ENTRIES) - OPTIONAL:
        assert results[name]["status"] == "ok", results[name]
        rows = results[name]["rows"]
        assert rows, name
        groups = {r["group"] for r in rows}
        for group in groups:
            in_group = [r for r in rows if r["group"] == group]
            (anchor,) = [r for r in in_group if r["is_anchor"]]
            assert anchor["ratio"] == 1.0 and not anchor["worse"]
            for row in in_group:
                assert row["min"] <= row["median"] <= row["max"]
                assert math.isclose(row["ratio"], row["median"] / anchor["median"], rel_tol=1e-9)
                if row["worse"]:
                    assert row["ratio"] > 1 and row["note"], f"{row['name']} is worse than its anchor without a note"
    table = md_path.read_text()
    assert "| Case | Median | Min – max | vs anchor | Note |" in table
    assert "× dense LoRA float32" in table and "× PEFT LoRA" in table and "× merged adapter" in table
    assert table.count("| anchor |") == sum(r["is_anchor"] for e in results.values() for r in e.get("rows", []))
    assert table.strip() in proc.stdout


def test_wire_bytes_quick_rows_show_sparse_payload_below_dense(quick_run):
    proc, out = quick_run
    rows = next(
        r for r in json.loads(next(out.glob("*-quick.json")).read_text())["results"] if r["entry"] == "wire_bytes"
    )
    by_name = {r["name"].split()[-1] + "/" + r["params"]["dtype"]: r for r in rows["rows"]}
    for dtype in ("float32", "float16", "bfloat16"):
        later, limit = by_name[f"solora_round_n/{dtype}"], by_name[f"limit_nnz_x_value_bytes/{dtype}"]
        assert limit["median"] < later["median"] < by_name[f"solora_round0/{dtype}"]["median"]
        assert later["ratio"] < 1  # sparse values only are fewer bytes than dense A and B at the same rank


def test_moe_latency_rows_cover_every_router_against_the_merged_adapter(quick_run):
    from moe_router import ROUTERS

    _, out = quick_run
    result = next(r for r in json.loads(next(out.glob("*-quick.json")).read_text())["results"]
                  if r["entry"] == "moe_latency")  # fmt: skip
    names = {r["name"] for r in result["rows"]}
    for phase in ("prefill", "decode"):
        assert f"{phase} merged_adapter" in names and f"{phase} moe_E4" in names  # moe_E4: the implicit router
        assert {f"{phase} router_{n}_E4" for n in ROUTERS if n != "implicit"} <= names, phase
    default = result["rows"][0]["params"]["default_router"]
    assert default == "sequence" and all("default router" in r["note"] for r in result["rows"]
                                          if r["name"].endswith(f"router_{default}_E4") and r["worse"])  # fmt: skip


def test_missing_optional_entry_is_skipped_and_reported(monkeypatch):
    """Without the optional ``ray`` extra the Ray entry is skipped and says so (simulated: ``ray`` made unimportable,
    so this test never starts a Ray instance inside the test process)."""
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "benchmarks.ray_scale", raising=False)
    result = run_entry("ray_scale", repeats=1, quick=True)
    assert result["status"] == "skipped"
    info = dict(machine_info(argv=["x"]), repeats=1)
    assert "ray_scale (skipped" in markdown_table([result], info)
    with pytest.raises(ModuleNotFoundError):
        run_entry("no_such_entry", repeats=1, quick=True)


def test_rows_against_ratios_and_worse_notes():
    rows = rows_against(
        "e", {"a": Measure((2.0, 4.0, 3.0)), "b": constant(6.0), "c": constant(1.5)}, anchor="a", unit="s",
        worse_notes={"b": "why b is slower", "c": "unused"},
    )  # fmt: skip
    by = {r["name"]: r for r in rows}
    assert by["a"]["median"] == 3.0 and by["a"]["min"] == 2.0 and by["a"]["max"] == 4.0 and by["a"]["ratio"] == 1.0
    assert by["b"]["ratio"] == 2.0 and by["b"]["worse"] and by["b"]["note"] == "why b is slower"
    assert by["c"]["ratio"] == 0.5 and not by["c"]["worse"] and by["c"]["note"] == ""
    with pytest.raises(ValueError, match="anchor"):
        rows_against("e", {"a": constant(1.0)}, anchor="z", unit="s")


def test_measure_interleaved_counts_warmup_and_repeats():
    calls = {"x": 0}

    def fn():
        calls["x"] += 1

    result = measure_interleaved({"x": fn}, repeats=4, warmup=2)
    assert calls["x"] == 6 and len(result["x"].samples) == 4
    with pytest.raises(ValueError, match="repeats"):
        measure_interleaved({"x": fn}, repeats=0)


def test_normalize_row_accepts_the_older_seconds_shape():
    row = normalize_row("moe", {"name": "m", "median_s": 2.0, "min_s": 1.0, "max_s": 3.0, "ratio_to_anchor": 1.5,
                                "anchor": "a"})  # fmt: skip
    assert (row["median"], row["min"], row["max"], row["unit"], row["ratio"], row["worse"]) == (2.0, 1.0, 3.0, "s",
                                                                                                 1.5, True)  # fmt: skip
    with pytest.raises(ValueError, match="median"):
        normalize_row("moe", {"name": "m"})
