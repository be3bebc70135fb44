"""Model cards where repos are written: every gossip push (the AdapterCards hook), publish_adapter, and the MoE's
save_pretrained/push."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import moe_router
import peft_sorlora
from model_cards import check_card, extract_python_snippets, parse_sections
from sorlora_gossip import DenseUpdate, Peer, round_tag
from sorlora_gossip.cards import AdapterCards, publish_adapter
from sorlora_gossip.hub import LocalHub
from sorlora_gossip.peer import CARD_FILE, INFO_FILE, UPDATE_FILE

from .gossip_payloads import calibrated_mlp, update_for_round

HAND_WRITTEN = "We ran this peer on a laptop over a weekend; ask @alice before using it in production."


def sections(text: str) -> dict[str, str]:
    return {s.name: s.body for s in parse_sections(ModelCard(text).text)}


def card_at(hub, repo_id: str, revision: str) -> tuple[ModelCard, str]:
    """The README.md at ``revision`` loaded with ModelCard.load, and its text."""
    path = hub.download(repo_id, CARD_FILE, revision=revision)
    return ModelCard.load(path), Path(path).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------- gossip


def test_each_push_carries_the_card_and_keeps_user_edits(hub, new_hub):
    model, neighbour_model = calibrated_mlp(slot=0, seed=0), calibrated_mlp(slot=1, seed=1)
    config = model.peft_config["default"].to_dict()
    peer = Peer(hub, "alice", task="strategyqa", cluster=1, hook=AdapterCards(config, task="strategyqa"))
    neighbour = Peer(new_hub(), "bob")
    updates = [update_for_round(model, r, seed=0) for r in range(3)]

    first = peer.push_round(0, updates[0], metrics={"accuracy": 0.5})
    neighbour.push_round(0, update_for_round(neighbour_model, 0, seed=1))
    assert hub.list_files(peer.repo_id, revision=round_tag(0)) == sorted([CARD_FILE, INFO_FILE, UPDATE_FILE])
    card, text = card_at(hub, peer.repo_id, round_tag(0))
    check_card(text, kind="adapter")
    assert card.data.base_model == "toy/mlp-32" and "strategyqa" in card.data.tags
    body = sections(text)
    assert "| accuracy | 0.5 |" in body["metrics"]
    assert "1 round(s)" in body["rounds"] and f"{updates[0].num_values:,} parameters" in body["rounds"]
    assert "| Slot | 0 |" in body["config"] and "`1`" in body["peer"]
    assert peer.pull_round(0, ["bob"], timeout=5).complete

    # "the user" edits the card on the hub between rounds: a commit of README.md only, from another client
    user = new_hub()
    edited = text.replace("## Notes\n", f"## Notes\n\n{HAND_WRITTEN}\n")
    assert edited != text
    user.create_commit(peer.repo_id, {CARD_FILE: edited.encode()}, commit_message="user: notes")

    second = peer.push_round(1, updates[1], metrics={"accuracy": 0.75})
    card, text = card_at(hub, peer.repo_id, round_tag(1))
    check_card(card, kind="adapter")
    body = sections(text)
    assert text.count(HAND_WRITTEN) == 1, "the hand-written paragraph survives the push"
    assert "| accuracy | 0.75 |" in body["metrics"] and "0.5 |" not in body["metrics"]
    assert "2 round(s)" in body["rounds"] and "`bob`" in body["peer"]
    messages = [c.message for c in hub.list_commits(peer.repo_id)]
    assert messages == ["alice: round-0001", "user: notes", "alice: round-0000", "initial commit"]

    # payloads are what they always were: the update's bytes, checked by peer.json
    assert hub.read_bytes(peer.repo_id, UPDATE_FILE, revision=round_tag(1)) == updates[1].to_bytes()
    info = json.loads(hub.read_bytes(peer.repo_id, INFO_FILE, revision=round_tag(1)))
    assert info["history"] == [
        {"round": 0, "bytes": first.bytes, "params_transmitted": updates[0].num_values, "neighbours": None},
        {"round": 1, "bytes": second.bytes, "params_transmitted": updates[1].num_values, "neighbours": ["bob"]},
    ]
    pulled = Peer(new_hub(), "carol").pull_round(1, ["alice"], timeout=5)
    assert pulled.complete and pulled.bytes["alice"] == second.bytes

    # a resumed peer (fresh process: only the hub remembers) continues the history and keeps the user's text
    resumed = Peer(new_hub(), "alice", task="strategyqa", cluster=1, hook=AdapterCards(config, task="strategyqa"))
    assert resumed.last_pushed_round() == 1
    resumed.push_round(2, updates[2], metrics={"accuracy": 0.8})
    _, text = card_at(hub, peer.repo_id, round_tag(2))
    assert text.count(HAND_WRITTEN) == 1 and "3 round(s)" in sections(text)["rounds"]
    info = json.loads(hub.read_bytes(peer.repo_id, INFO_FILE, revision=round_tag(2)))
    assert [h["round"] for h in info["history"]] == [0, 1, 2]


def test_dense_payloads_push_without_card(hub):
    torch.manual_seed(0)
    peer = Peer(hub, "dense", task="t", payload_cls=DenseUpdate)
    for r in range(2):
        metadata = {"round": str(r), "base_model": "toy/mlp-32", "config_hash": "lora"}
        update = DenseUpdate(values={"layer.lora_A": torch.randn(4, 8), "layer.lora_B": torch.randn(8, 4)},
                             metadata=metadata)  # fmt: skip
        result = peer.push_round(r, update.to_bytes())  # bytes are parsed by the peer's payload class
        assert result.created
    assert CARD_FILE not in hub.list_files(peer.repo_id)
    info = json.loads(hub.read_bytes(peer.repo_id, INFO_FILE, revision=round_tag(1)))
    assert [h["params_transmitted"] for h in info["history"]] == [64, 64]
    # a LoRA config is not something the SO-LoRA card can describe: refused when the peer is made, not at a push
    with pytest.raises(ValueError, match="projection"):
        AdapterCards({"r": 4, "lora_alpha": 8}, task="t", peer_id="dense2")
    with pytest.raises(ValueError, match="task"):
        AdapterCards(calibrated_mlp().peft_config["default"].to_dict(), task=None, peer_id="anon")


def test_damaged_card_on_the_hub_does_not_block_the_exchange(hub, caplog):
    model = calibrated_mlp()
    peer = Peer(hub, "alice", task="t", hook=AdapterCards(model.peft_config["default"].to_dict(), task="t"))
    peer.push_round(0, update_for_round(model, 0, seed=0))
    _, text = card_at(hub, peer.repo_id, "main")
    damaged = text.replace("<!-- sorlora:end metrics -->", "")
    hub.create_commit(peer.repo_id, {CARD_FILE: damaged.encode()}, commit_message="user: oops")
    assert peer.push_round(1, update_for_round(model, 1, seed=0), metrics={"accuracy": 0.9}).created
    assert "README.md not updated" in caplog.text
    assert hub.read_bytes(peer.repo_id, CARD_FILE, revision=round_tag(1)).decode() == damaged, "user's text untouched"


# ------------------------------------------------------------------------------------------------- publish_adapter

INPUT_IDS = torch.arange(1, 17).reshape(2, 8)
SNIPPET_CHECK = """
import torch
from safetensors.torch import save_file

with torch.no_grad():
    save_file({"logits": model(input_ids=torch.arange(1, 17).reshape(2, 8)).logits.contiguous()}, OUT)
"""


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """A tiny Llama and a calibrated SO-LoRA adapter on it, both saved with save_pretrained, and the adapter's logits."""
    root = tmp_path_factory.mktemp("publish")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "base")
    adapter_config = peft_sorlora.SOLoRAConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False, sparsity=0.5, slot=1
    )
    model = get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"), adapter_config)
    peft_sorlora.calibrate(model, [{"input_ids": INPUT_IDS, "labels": INPUT_IDS}])
    model.eval()
    model.save_pretrained(root / "adapter")
    with torch.no_grad():
        logits = model(input_ids=INPUT_IDS).logits
        with model.disable_adapter():
            assert not torch.allclose(logits, model(input_ids=INPUT_IDS).logits, atol=1e-4)
    return root / "base", root / "adapter", model, logits


def test_publish_adapter_card_snippet_loads_it(hub, saved_adapter, tmp_path, request):
    base_dir, adapter_dir, model, logits = saved_adapter
    base_id = hub.repo_id("tiny-llama")
    hub.create_repo(base_id)
    hub.create_commit(base_id, {p.name: p for p in base_dir.iterdir() if p.is_file()}, commit_message="base")
    config = model.peft_config["default"].to_dict()
    peer = Peer(hub, "peer-3", task="intent", cluster=0, base_model=base_id, hook=AdapterCards(config, task="intent"))
    files = {name: adapter_dir / name for name in ("adapter_config.json", "adapter_model.safetensors")}
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        publish_adapter(peer, {"adapter_config.json": files["adapter_config.json"]})
    with pytest.raises(ValueError, match="round tag"):
        publish_adapter(peer, files, tag="round-0001")

    sha = publish_adapter(peer, files, metrics={"accuracy": 0.625})
    assert hub.resolve(peer.repo_id, "final") == sha
    assert set(hub.list_files(peer.repo_id, revision="final")) >= {CARD_FILE, *files}
    card, text = card_at(hub, peer.repo_id, "final")
    check_card(card, kind="adapter")
    assert card.data.base_model == base_id and "| accuracy | 0.625 |" in sections(text)["metrics"]
    (snippet,) = extract_python_snippets(sections(text)["usage"])
    assert f'PeftModel.from_pretrained(base_model, "{peer.repo_id}", revision="final")' in snippet
    assert "import peft_sorlora" in snippet

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_XET": "1"}
    if isinstance(hub, LocalHub):
        # LocalHub is no Hub endpoint: lay its repos out as folders named by repo id and run the snippet among them
        cwd = tmp_path / "checkout"
        for repo, revision in ((base_id, "main"), (peer.repo_id, "final")):
            for name in hub.list_files(repo, revision=revision):
                target = cwd / repo / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(hub.read_bytes(repo, name, revision=revision))
        env["HF_HUB_OFFLINE"] = "1"
    else:
        cwd = tmp_path
        env["HF_ENDPOINT"] = hub.endpoint  # read at import, so it is set before the process starts
        env.pop("HF_HUB_OFFLINE", None)
    out = tmp_path / "logits.safetensors"
    code = f"OUT = {str(out)!r}\n" + snippet + SNIPPET_CHECK
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    torch.testing.assert_close(load_file(out)["logits"], logits, atol=1e-6, rtol=1e-5)
    if not isinstance(hub, LocalHub):
        requests = [path for _, path in request.getfixturevalue("hub_server").requests]
        assert any(path.startswith(f"/{peer.repo_id}/resolve/final/") for path in requests), "snippet used the tag"

    with pytest.raises(Exception, match="final"):
        publish_adapter(peer, files)  # the tag exists: a second publish under it is refused


# ------------------------------------------------------------------------------------------------------ moe_router

RESULTS = {"strategyqa": {"dfl-lora": 0.5, "proposed": 0.625}, "intent": {"dfl-lora": 0.25, "proposed": 0.75}}


@pytest.fixture(scope="module")
def moe(saved_adapter):
    base_dir, adapter_dir, _, _ = saved_adapter
    model = moe_router.ImplicitMoEForCausalLM.from_adapters(str(base_dir), adapters=[str(adapter_dir)]).eval()
    model.config.experts[0]["members"][0].update(peer="peer-3", task="intent")  # as a gossip run describes members
    return model


def test_moe_save_pretrained_writes_and_updates_its_card(moe, tmp_path):
    target = tmp_path / "moe"
    moe.save_pretrained(target)
    text = (target / CARD_FILE).read_text()
    card = check_card(text, kind="moe")
    assert card.data.base_model == moe.config.base_model_name_or_path and not card.data.eval_results
    body = sections(text)
    assert "No evaluation results reported yet." in body["results"]
    assert "| `expert_0` | `peer-3` | intent |" in body["experts"]
    assert "| `routing` | implicit |" in body["router"]
    assert extract_python_snippets(body["usage"])[0].count(repr(str(target)).replace("'", '"')) == 1

    (target / CARD_FILE).write_text(text.replace("## Notes\n", f"## Notes\n\n{HAND_WRITTEN}\n"))
    communication = {"proposed": {"params_transmitted": 1200}}
    moe.save_pretrained(target, card_info={"results": RESULTS, "communication": communication})
    text = (target / CARD_FILE).read_text()
    card = check_card(text, kind="moe")
    assert text.count(HAND_WRITTEN) == 1
    assert {r.dataset_name: r.metric_value for r in card.data.eval_results} == {"strategyqa": 0.625, "intent": 0.75}
    assert "| proposed | 1,200 |" in sections(text)["communication"]
    loaded = moe_router.ImplicitMoEForCausalLM.from_pretrained(target)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=INPUT_IDS).logits, moe(input_ids=INPUT_IDS).logits)


def test_moe_saves_without_model_cards_installed(moe, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "model_cards", None)  # import model_cards now raises ImportError
    moe.save_pretrained(tmp_path / "moe")
    assert not (tmp_path / "moe" / CARD_FILE).exists()
    assert {"config.json", "experts.safetensors"} <= {p.name for p in (tmp_path / "moe").iterdir()}
    assert "model_cards is not importable" in caplog.text


def test_moe_push_to_hub_card_keeps_hub_edits(moe, tmp_path, hub_server):
    local = tmp_path / "moe"
    moe.save_pretrained(local)
    repo_id = "gossip/tiny-moe"
    script = f"""
        import moe_router
        from huggingface_hub import HfApi, hf_hub_download
        model = moe_router.ImplicitMoEForCausalLM.from_pretrained({str(local)!r})
        model.config.base_model_name_or_path = "gossip/tiny-base"  # a pushed MoE names its base by Hub id, not path
        model.push_to_hub({repo_id!r}, tags=["demo"])
        text = open(hf_hub_download({repo_id!r}, "README.md")).read()
        HfApi().upload_file(path_or_fileobj=text.replace("## Notes\\n", "## Notes\\n\\n{HAND_WRITTEN}\\n").encode(),
                            path_in_repo="README.md", repo_id={repo_id!r}, commit_message="user: notes")
        model.push_to_hub({repo_id!r}, card_info={{"results": {RESULTS!r}}})
    """
    env = dict(os.environ, HF_ENDPOINT=hub_server.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "home"))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    api = HfApi(endpoint=hub_server.endpoint)
    commits = [c.title for c in api.list_repo_commits(repo_id)]
    assert "user: notes" in commits and len(commits) >= 4
    path = api.hf_hub_download(repo_id, CARD_FILE, cache_dir=tmp_path / "cache")
    text = Path(path).read_text()
    card = check_card(text, kind="moe")
    assert text.count(HAND_WRITTEN) == 1
    assert "[More Information Needed]" not in text, "transformers' placeholder card is replaced, not kept"
    assert {"demo", "solora", "mixture-of-experts"} <= set(card.data.tags)
    assert {r.dataset_name for r in card.data.eval_results} == {"strategyqa", "intent"}
    (snippet,) = extract_python_snippets(sections(text)["usage"])
    assert f'from_pretrained("{repo_id}")' in snippet


# ------------------------------------------------------------------------------------------ model_cards additions


def test_card_info_revision_and_moe_card_before_evaluation():
    from model_cards import AdapterCardInfo, ExpertInfo, MoECardInfo, adapter_card, moe_card

    fields = dict(
        repo_id="a/b",
        base_model="base/m",
        peer_id="p",
        task="t",
        config=calibrated_mlp().peft_config["default"].to_dict(),
    )
    (snippet,) = extract_python_snippets(str(adapter_card(AdapterCardInfo(**fields))))
    assert "revision" not in snippet
    (snippet,) = extract_python_snippets(str(adapter_card(AdapterCardInfo(**fields, revision="v1"), lora_export=True)))
    assert 'PeftModel.from_pretrained(base_model, "a/b", revision="v1")' in snippet
    with pytest.raises(ValueError, match="revision"):
        AdapterCardInfo(**fields, revision=" ")

    info = MoECardInfo(repo_id="a/moe", base_model="base/m", experts=[ExpertInfo(0, ["p"], ["t"])], router_top_k=None,
                       refinement="none", results={})  # fmt: skip
    text = str(moe_card(info))
    check_card(text, kind="moe")
    assert "model-index" not in text and "No evaluation results reported yet." in sections(text)["results"]
    with_results = str(moe_card(dataclasses.replace(info, results={"t": {"proposed": 0.5}})))
    # metadata and table must agree: a results table without model-index (or the reverse) is reported
    meta, body = with_results.split("\n---\n", 1)
    with pytest.raises(ValueError, match="model-index"):
        check_card(text.split("\n---\n", 1)[0] + "\n---\n" + body, kind="moe")
    with pytest.raises(ValueError, match="no table"):
        check_card(meta + "\n---\n" + text.split("\n---\n", 1)[1], kind="moe")
