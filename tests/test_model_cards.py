"""Model cards: metadata and sections of both card kinds, round trips, section-preserving updates, working snippets."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, hf_hub_download
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import peft_sorlora
from model_cards import (
    AdapterCardInfo,
    ExpertInfo,
    MoECardInfo,
    RoundRecord,
    adapter_card,
    check_card,
    extract_python_snippets,
    moe_card,
    parse_sections,
    update_card,
    update_card_file,
    write_card,
)

from .solora_models import tiny_llama

CONFIG = {
    "r": 4,
    "lora_alpha": 8,
    "projection": "orthogonal",
    "projection_seed": 7,
    "slot": 1,
    "sparsity": 0.5,
    "sparsity_allocation": "spectral_entropy",
    "target_modules": {"v_proj", "q_proj"},
    "layer_sparsity": {"l0.q": 0.25, "l0.v": 0.5, "l1.q": 0.75, "l1.v": 0.5},
}


def make_info(**overrides) -> AdapterCardInfo:
    fields = dict(
        repo_id="alice/sorlora-peer-3",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        peer_id="peer-3",
        task="intent_recognition",
        dataset="bigbench",
        cluster=2,
        neighbours=["peer-1", "peer-4"],
        config=CONFIG,
        rounds=[RoundRecord(0, 1200, 10_000, 2), RoundRecord(1, 600, 2_500, 2)],
        params_updated=1200,
        metrics={"accuracy": 0.6125, "loss": 1.75},
    )
    fields.update(overrides)
    return AdapterCardInfo(**fields)


def make_moe_info(**overrides) -> MoECardInfo:
    fields = dict(
        repo_id="alice/sorlora-moe",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        experts=[
            ExpertInfo(cluster=0, peers=["peer-0", "peer-1"], tasks=["strategyqa", "strategyqa"]),
            ExpertInfo(cluster=1, peers=["peer-2"], tasks=["intent_recognition"]),
        ],
        router_top_k=3,
        refinement=True,
        results={
            "strategyqa": {"dfl-lora": 0.51, "proposed": 0.58, "oracle": 0.6},
            "intent_recognition": {"dfl-lora": 0.41, "proposed": 0.66, "oracle": 0.7},
        },
        test_size={"strategyqa": 100, "intent_recognition": 80},
        communication={
            "dfl-lora": {"params_transmitted": 2_000_000, "bytes_sent": 8_000_000},
            "proposed": {"params_transmitted": 300_000, "bytes_sent": 1_200_000},
        },
    )
    fields.update(overrides)
    return MoECardInfo(**fields)


def section_body(text: str, name: str) -> str:
    return {s.name: s.body for s in parse_sections(ModelCard(text).text)}[name]


# --------------------------------------------------------------------------------------------------------------------
# Adapter card: metadata, content, round trip


def test_adapter_card_metadata_and_content(tmp_path):
    card = adapter_card(make_info())
    check_card(card, kind="adapter")
    data = card.data
    assert data.library_name == "peft"
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.get("base_model_relation") == "adapter"
    assert {"solora", "decentralized-federated-learning", "intent_recognition", "arxiv:2602.20492"} <= set(data.tags)
    assert "lora" not in data.tags, "a native SO-LoRA checkpoint must not be tagged as plain LoRA"
    assert data.datasets == ["bigbench"]

    text = str(card)
    peer = section_body(text, "peer")
    assert "`peer-3`" in peer and "intent_recognition" in peer and "`2`" in peer
    assert "`peer-1`, `peer-4`" in peer
    config = section_body(text, "config")
    for row in ("| Rank `r` | 4 |", "| Projection mode | orthogonal |", "| Projection seed | 7 |", "| Slot | 1 |"):
        assert row in config
    assert "| Target modules | q_proj, v_proj |" in config
    # per-layer summary computed from layer_sparsity: min 0.25, mean 0.5, max 0.75 over 4 layers
    assert "| Adapted layers | 4 |" in config
    assert "(min) | 0.25 |" in config and "(mean) | 0.5 |" in config and "(max) | 0.75 |" in config
    rounds = section_body(text, "rounds")
    assert "2 round(s)" in rounds and "1,800 parameters" in rounds and "12.2 KiB" in rounds
    metrics = section_body(text, "metrics")
    assert "| accuracy | 0.6125 |" in metrics and "| loss | 1.75 |" in metrics
    assert "arXiv:2602.20492" in section_body(text, "citation")

    path = tmp_path / "README.md"
    write_card(card, path)
    loaded = ModelCard.load(path)
    assert loaded.data.to_dict() == card.data.to_dict()
    assert str(loaded) == str(card)


def test_adapter_snippet_names_repo_and_imports_package():
    card = adapter_card(make_info())
    (snippet,) = extract_python_snippets(section_body(str(card), "usage"))
    tree = ast.parse(snippet)
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "peft_sorlora" in imported
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert {"alice/sorlora-peer-3", "HuggingFaceTB/SmolLM2-135M-Instruct"} <= strings


def test_lora_export_card_is_tagged_lora_and_needs_no_package():
    card = adapter_card(make_info(), lora_export=True)
    check_card(card, kind="adapter")
    assert "lora" in card.data.tags and "solora" in card.data.tags
    (snippet,) = extract_python_snippets(str(card))
    assert "peft_sorlora" not in snippet and "PeftModel.from_pretrained" in snippet


def test_adapter_card_before_first_round():
    card = adapter_card(make_info(rounds=[], metrics={}, cluster=None, neighbours=[], params_updated=None))
    check_card(card, kind="adapter")
    text = str(card)
    assert "No exchange round has been pushed yet" in section_body(text, "rounds")
    assert "No metrics reported yet." in section_body(text, "metrics")
    assert "not assigned yet" in section_body(text, "peer")


def test_adapter_card_keeps_only_last_rounds():
    rounds = [RoundRecord(i, 10, 100) for i in range(30)]
    text = str(adapter_card(make_info(rounds=rounds)))
    body = section_body(text, "rounds")
    assert "30 round(s)" in body and "300 parameters" in body and "last 20 rounds" in body
    assert "| 29 |" in body and "| 9 |" not in body


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"config": {k: v for k, v in CONFIG.items() if k != "projection_seed"}}, "projection_seed"),
        ({"repo_id": " "}, "repo_id"),
        ({"neighbours": "peer-1"}, "neighbours"),
        ({"metrics": {"accuracy": "high"}}, "accuracy"),
        ({"rounds": [{"round": 0}]}, "RoundRecord"),
    ],
)
def test_adapter_card_rejects_bad_input(overrides, message):
    with pytest.raises(ValueError, match=message):
        adapter_card(make_info(**overrides))


def test_round_record_rejects_negative_counts():
    with pytest.raises(ValueError, match="bytes_sent"):
        RoundRecord(0, 10, -1)


# --------------------------------------------------------------------------------------------------------------------
# MoE card


def test_moe_card_model_index_and_round_trip(tmp_path):
    info = make_moe_info()
    card = moe_card(info)
    check_card(card, kind="moe")
    path = tmp_path / "README.md"
    write_card(card, path)
    loaded = ModelCard.load(path)
    assert loaded.data.to_dict() == card.data.to_dict()
    assert loaded.data.base_model == info.base_model
    assert loaded.data.library_name == "transformers"
    assert loaded.data.get("base_model_relation") == "adapter"
    assert moe_card(make_moe_info(base_in_repo=True)).data.get("base_model_relation") == "finetune"
    assert {"solora", "mixture-of-experts", "arxiv:2602.20492"} <= set(loaded.data.tags)
    assert "lora" not in loaded.data.tags
    results = {r.dataset_name: r.metric_value for r in loaded.data.eval_results}
    assert results == {"strategyqa": 0.58, "intent_recognition": 0.66}
    assert {r.metric_type for r in loaded.data.eval_results} == {"accuracy"}
    assert loaded.data.model_name == "sorlora-moe"

    text = str(loaded)
    table = section_body(text, "results")
    assert "| Task | n | dfl-lora | **proposed** | oracle |" in table
    assert "| strategyqa | 100 | 0.51 | 0.58 | 0.6 |" in table
    assert "| **Average** | | 0.46 | 0.62 | 0.65 |" in table
    experts = section_body(text, "experts")
    assert (
        "| `0` | `peer-0`, `peer-1` | strategyqa |" in experts and "| `1` | `peer-2` | intent_recognition |" in experts
    )
    assert "| `router_top_k` | 3 |" in section_body(text, "router")
    header = section_body(text, "header")
    assert "refined with its task's input statistics" in header and "the 3 largest components" in header
    plain = section_body(str(moe_card(make_moe_info(refinement="none", router_top_k=None))), "header")
    assert "refined" not in plain and "keeping all components" in plain
    comm = section_body(text, "communication")
    assert "| proposed | 300,000 | 1,200,000 |" in comm
    assert "2602.20492" in section_body(text, "citation")


def test_moe_average_only_for_methods_with_every_task():
    info = make_moe_info(results={"a": {"proposed": 0.5, "oracle": 0.9}, "b": {"proposed": 0.7}}, test_size={})
    table = section_body(str(moe_card(info)), "results")
    assert "| **Average** | 0.6 |  |" in table


def test_moe_snippet_parses_and_names_repo():
    card = moe_card(make_moe_info())
    (snippet,) = extract_python_snippets(section_body(str(card), "usage"))
    tree = ast.parse(snippet)
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "moe_router" in imported
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "from_pretrained"]
    assert [call.args[0].value for call in calls] == ["alice/sorlora-moe"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"experts": []}, "experts"),
        ({"method": "missing"}, "missing"),
        ({"router_top_k": 0}, "router_top_k"),
        ({"results": {"a": {"proposed": float("nan")}}, "test_size": {}}, "finite"),
        ({"test_size": {"unknown": 5}}, "unknown"),
        ({"experts": [ExpertInfo(0, ["p"], ["t"]), ExpertInfo(0, ["q"], ["t"])]}, "repeats"),
    ],
)
def test_moe_card_rejects_bad_input(overrides, message):
    with pytest.raises(ValueError, match=message):
        moe_card(make_moe_info(**overrides))


# --------------------------------------------------------------------------------------------------------------------
# Updates keep what users wrote

HAND_WRITTEN = "We trained this peer on a laptop over a weekend; ask @alice before using it in production."


def test_update_changes_generated_sections_and_keeps_user_text(tmp_path):
    path = tmp_path / "README.md"
    update_card_file(path, adapter_card(make_info()))
    # a user edits the card: a paragraph under Notes, and a license in the metadata
    edited = path.read_text().replace("## Notes\n", f"## Notes\n\n{HAND_WRITTEN}\n")
    edited = edited.replace("---\n", "---\nlicense: mit\n", 1)
    path.write_text(edited)

    newer = make_info(
        metrics={"accuracy": 0.7375, "loss": 1.25},
        rounds=[*make_info().rounds, RoundRecord(2, 600, 2_500, 2)],
    )
    card = update_card_file(path, adapter_card(newer))
    text = path.read_text()
    assert str(card) == text
    check_card(text, kind="adapter")
    assert HAND_WRITTEN in text and text.count(HAND_WRITTEN) == 1
    assert ModelCard.load(path).data.license == "mit"
    metrics = section_body(text, "metrics")
    assert "| accuracy | 0.7375 |" in metrics and "0.6125" not in text
    assert "3 round(s)" in section_body(text, "rounds")
    assert [s.name for s in parse_sections(ModelCard(text).text)] == [
        s.name for s in parse_sections(adapter_card(newer).text)
    ]
    # regenerating with the same data changes nothing
    assert update_card(text, adapter_card(newer)) == text


def test_update_inserts_new_sections_and_drops_stale_ones():
    card = str(adapter_card(make_info()))
    body = ModelCard(card).text
    sections = {s.name: s for s in parse_sections(body)}
    # an older card: no metrics section, plus a generated section the current template no longer has
    old = card.replace(
        sections["metrics"].text, "<!-- sorlora:begin legacy -->\nold stuff\n<!-- sorlora:end legacy -->"
    )
    merged = update_card(old, adapter_card(make_info()))
    names = [s.name for s in parse_sections(ModelCard(merged).text)]
    assert names == [s.name for s in parse_sections(body)]
    assert "old stuff" not in merged


def test_update_onto_foreign_card_keeps_it_below():
    foreign = "---\nlicense: apache-2.0\n---\n\n# My adapter\n\n" + HAND_WRITTEN + "\n"
    merged = update_card(foreign, adapter_card(make_info()))
    check_card(merged, kind="adapter")
    assert HAND_WRITTEN in merged and ModelCard(merged).data.license == "apache-2.0"
    assert merged.index("sorlora:begin header") < merged.index(HAND_WRITTEN)


def test_update_rejects_damaged_markers():
    text = str(adapter_card(make_info())).replace("<!-- sorlora:end peer -->", "")
    with pytest.raises(ValueError, match="peer"):
        update_card(text, adapter_card(make_info()))
    with pytest.raises(ValueError, match="metadata"):
        update_card("---\n[not, a, dict\n---\ntext", adapter_card(make_info()))


def test_check_card_reports_problems():
    text = str(adapter_card(make_info()))
    broken = text.replace("library_name: peft", "library_name: timm").replace("<!-- sorlora:begin config -->", "")
    with pytest.raises(ValueError, match="library_name") as info:
        check_card(broken, kind="adapter")
    assert "config" in str(info.value)
    with pytest.raises(ValueError, match="model-index"):
        check_card(text.replace("library_name: peft", "library_name: transformers"), kind="moe")


# --------------------------------------------------------------------------------------------------------------------
# The loading snippets run against real saved repos


INPUT_IDS = torch.arange(1, 17).reshape(2, 8)


@pytest.fixture(scope="module")
def saved_repo(tmp_path_factory):
    """A base model dir and a calibrated SO-LoRA adapter dir saved with save_pretrained, plus the adapter's logits."""
    root = tmp_path_factory.mktemp("repo")
    base_dir, adapter_dir = root / "base", root / "adapter"
    tiny_llama().save_pretrained(base_dir)
    config = peft_sorlora.SOLoRAConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False, sparsity=0.5, slot=1
    )
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), config)
    peft_sorlora.calibrate(model, [{"input_ids": INPUT_IDS, "labels": INPUT_IDS}])
    model.eval()
    model.save_pretrained(adapter_dir)  # PEFT writes its default README.md here
    with torch.no_grad():
        logits = model(input_ids=INPUT_IDS).logits
        with model.disable_adapter():
            base_logits = model(input_ids=INPUT_IDS).logits
    assert not torch.allclose(logits, base_logits, atol=1e-4), (
        "the adapter must change the output, or loading proves nothing"
    )
    return base_dir, adapter_dir, model, logits


def card_info_for(model: PeftModel, repo_id: str, base_model: str) -> AdapterCardInfo:
    return make_info(repo_id=repo_id, base_model=base_model, config=model.peft_config["default"].to_dict())


def run_snippet(card_path: Path) -> dict:
    (snippet,) = extract_python_snippets(ModelCard.load(card_path).text)
    namespace: dict = {}
    exec(compile(snippet, str(card_path), "exec"), namespace)  # noqa: S102 - the point is to run the card's code
    return namespace


def test_snippet_loads_saved_adapter_from_local_dir(saved_repo):
    base_dir, adapter_dir, model, logits = saved_repo
    readme = adapter_dir / "README.md"
    assert "[More Information Needed]" in readme.read_text(), "expected PEFT's default card from save_pretrained"
    card = update_card_file(readme, adapter_card(card_info_for(model, str(adapter_dir), str(base_dir))))
    check_card(card, kind="adapter")
    text = readme.read_text()
    assert "[More Information Needed]" not in text, "PEFT's empty template should be replaced, not kept"
    assert "Kept fraction of B" in text and "| Slot | 1 |" in text

    loaded = run_snippet(readme)["model"]
    assert isinstance(loaded, PeftModel)
    assert loaded.peft_config["default"].peft_type == peft.PeftType.SOLORA
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=INPUT_IDS).logits, logits, atol=1e-6, rtol=1e-5)


def test_snippet_loads_lora_export(saved_repo, tmp_path):
    base_dir, _, model, logits = saved_repo
    export_dir = tmp_path / "export"
    peft.save_as_lora(export_dir, model, rank=4)
    write_card(
        adapter_card(card_info_for(model, str(export_dir), str(base_dir)), lora_export=True), export_dir / "README.md"
    )
    loaded = run_snippet(export_dir / "README.md")["model"]
    assert loaded.peft_config["default"].peft_type == peft.PeftType.LORA
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=INPUT_IDS).logits, logits, atol=1e-5, rtol=1e-4)


def test_card_survives_peft_resave(saved_repo, tmp_path):
    """PEFT's save_pretrained rewrites README tags and base_model; writing the card after it restores them."""
    base_dir, _, model, _ = saved_repo
    info = card_info_for(model, str(tmp_path), str(base_dir))
    model.save_pretrained(tmp_path)
    update_card_file(tmp_path / "README.md", adapter_card(info))
    path = tmp_path / "README.md"
    path.write_text(path.read_text().replace("## Notes\n", f"## Notes\n\n{HAND_WRITTEN}\n"))
    model.save_pretrained(tmp_path)  # a later save: PEFT replaces the tags with its own
    assert "solora" not in ModelCard.load(path).data.tags
    card = update_card_file(path, adapter_card(info))
    check_card(card, kind="adapter")
    assert card.data.tags == adapter_card(info).data.tags and card.data.base_model == str(base_dir)
    assert path.read_text().count(HAND_WRITTEN) == 1
    assert path.read_text().count("<!-- sorlora:begin usage -->") == 1


def test_update_keeps_crlf_cards_consistent(tmp_path):
    path = tmp_path / "README.md"
    crlf = str(adapter_card(make_info())).replace("## Notes\n", f"## Notes\n\n{HAND_WRITTEN}\n").replace("\n", "\r\n")
    path.write_bytes(crlf.encode())
    update_card_file(path, adapter_card(make_info(metrics={"accuracy": 0.9})))
    raw = path.read_bytes().decode()
    assert raw.count("\n") == raw.count("\r\n"), "mixed line endings after the update"
    assert HAND_WRITTEN in raw and "| accuracy | 0.9 |" in raw


def test_update_without_existing_card_is_the_new_card():
    card = adapter_card(make_info())
    assert update_card(None, card) == str(card)


SNIPPET_CHECK = """
import torch
from safetensors.torch import save_file

with torch.no_grad():
    save_file({"logits": model(input_ids=torch.arange(1, 17).reshape(2, 8)).logits.contiguous()}, OUT)
"""


def test_snippet_loads_adapter_pushed_to_hub(saved_repo, hub_server, tmp_path):
    """Push base model and adapter (with its card) to a Hub server, then run the card's snippet in a fresh process."""
    base_dir, adapter_dir, model, logits = saved_repo
    api = HfApi(endpoint=hub_server.endpoint)
    base_id, repo_id = "gossip/tiny-llama", "gossip/sorlora-peer-3"
    staged = tmp_path / "staged"
    shutil.copytree(adapter_dir, staged)
    update_card_file(staged / "README.md", adapter_card(card_info_for(model, repo_id, base_id)))
    for rid, folder in ((base_id, base_dir), (repo_id, staged)):
        api.create_repo(rid, exist_ok=True)
        # one commit of all files, as the gossip push does (upload_folder would also ask the server to validate YAML)
        files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
        operations = [
            CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=p) for p in files
        ]
        api.create_commit(rid, operations=operations, commit_message="upload")

    card_path = hf_hub_download(repo_id, "README.md", endpoint=hub_server.endpoint, cache_dir=tmp_path / "cache")
    card = check_card(ModelCard.load(card_path), kind="adapter")
    assert card.data.base_model == base_id
    (snippet,) = extract_python_snippets(card.text)
    assert f'"{repo_id}"' in snippet and f'"{base_id}"' in snippet

    out = tmp_path / "logits.safetensors"
    env = {
        **os.environ,
        "HF_ENDPOINT": hub_server.endpoint,  # read at import, so it is set before the process starts
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("HF_HUB_OFFLINE", None)
    code = f"OUT = {str(out)!r}\n" + snippet + SNIPPET_CHECK
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(load_file(out)["logits"], logits, atol=1e-6, rtol=1e-5)
    assert any(path.startswith(f"/{repo_id}/resolve/") for _, path in hub_server.requests), (
        "snippet did not use the Hub"
    )


def test_moe_snippet_loads_saved_moe(saved_repo, tmp_path):
    """The MoE card's snippet, run verbatim, loads a merged model saved by moe_router and reproduces its output."""
    import moe_router  # the card's snippet imports it too; imported here to build the model under test

    base_dir, adapter_dir, _, _ = saved_repo
    moe = moe_router.ImplicitMoEForCausalLM.from_adapters(str(base_dir), adapters=[str(adapter_dir)]).eval()
    moe_dir = tmp_path / "moe"
    moe.save_pretrained(moe_dir)
    write_card(moe_card(make_moe_info(repo_id=str(moe_dir), base_model=str(base_dir))), moe_dir / "README.md")
    loaded = run_snippet(moe_dir / "README.md")["model"]
    assert type(loaded) is type(moe)
    with torch.no_grad():
        expected = moe(input_ids=INPUT_IDS).logits
        base = LlamaForCausalLM.from_pretrained(base_dir)(input_ids=INPUT_IDS).logits
        torch.testing.assert_close(loaded(input_ids=INPUT_IDS).logits, expected)
    assert not torch.allclose(expected, base, atol=1e-4), (
        "the experts must change the output, or loading proves nothing"
    )
