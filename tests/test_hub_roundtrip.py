"""An SO-LoRA adapter and an implicit MoE pushed to a Hub and loaded back elsewhere with the Auto classes.

Three separate OS processes talk to a ``HubServer`` on 127.0.0.1 through the real ``huggingface_hub`` client
(``HF_ENDPOINT``), each with its own empty Hugging Face cache:

1. the publisher pushes a tiny random base model as a normal model repo, trains an SO-LoRA adapter on it (masks
   calibrated automatically), builds the implicit MoE from it and pushes both with their ``push_to_hub``;
2. a user with this package loads them with ``AutoPeftModelForCausalLM.from_pretrained(repo)`` (after
   ``import peft_sorlora``) and ``AutoModelForCausalLM.from_pretrained(repo)`` (after ``import moe_router``): the
   base model comes from the same endpoint by the id recorded in the adapter and MoE configs; both generate;
3. a user without the package loads the MoE with ``trust_remote_code=True``.

Outputs must equal the publisher's bit for bit, both cards must validate (``model_cards.check_card``) and no pushed
file may carry a local path (``site-packages``, the test's temporary directories).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from huggingface_hub import HfApi

from model_cards import check_card, extract_python_snippets, parse_sections

BASE, ADAPTER, MOE = "test/tiny-base", "test/solora-adapter", "test/solora-moe"

PUBLISH = f"""
import json, sys, torch
from safetensors.torch import save_file
from huggingface_hub import HfApi
from peft import get_peft_model
import peft_sorlora, moe_router
from tests.solora_models import tiny_llama

base = peft_sorlora.set_base_identity(tiny_llama(), {BASE!r})
base.save_pretrained("base")
HfApi().create_repo({BASE!r}, exist_ok=True)
HfApi().upload_folder(repo_id={BASE!r}, folder_path="base")

config = peft_sorlora.SOLoRAConfig(r=4, target_modules=["q_proj", "v_proj"], sparsity=0.5, task_type="CAUSAL_LM")
model = get_peft_model(base, config)
ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model.train()
for _ in range(4):  # the first batch observes and freezes the masks, the others train
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
model.eval()
assert model.peft_config["default"].layer_sparsity is not None
model.push_to_hub({ADAPTER!r})
with torch.no_grad():
    adapter_logits = model(input_ids=ids).logits

moe_base = peft_sorlora.set_base_identity(tiny_llama(), {BASE!r})
moe = moe_router.ImplicitMoEForCausalLM.from_adapters(
    moe_base, adapters=[model], calibration={{0: [{{"input_ids": ids}}]}}
).eval()
assert moe.config.refine == "routing"
moe.push_to_hub({MOE!r})
with torch.no_grad():
    moe_logits = moe(input_ids=ids).logits
save_file({{"ids": ids, "adapter": adapter_logits, "moe": moe_logits}}, "ref.safetensors")
print("published")
"""

LOAD = """
import torch
from safetensors.torch import load_file
import peft_sorlora, moe_router
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM

ref = load_file("ref.safetensors")
adapter = AutoPeftModelForCausalLM.from_pretrained("{adapter}").eval()
moe = AutoModelForCausalLM.from_pretrained("{moe}").eval()
assert type(moe).__name__ == "ImplicitMoEForCausalLM", type(moe)
with torch.no_grad():
    a = float((adapter(input_ids=ref["ids"]).logits - ref["adapter"]).abs().max())
    m = float((moe(input_ids=ref["ids"]).logits - ref["moe"]).abs().max())
for model in (adapter, moe):
    out = model.generate(input_ids=ref["ids"][:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ref["ids"].shape[1] + 3), out.shape
print("loaded", a, m)
"""

REMOTE_CODE = """
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ref = load_file("ref.safetensors")
moe = AutoModelForCausalLM.from_pretrained("{moe}", trust_remote_code=True).eval()
assert "moe_router" not in sys.modules and "peft_sorlora" not in sys.modules
with torch.no_grad():
    m = float((moe(input_ids=ref["ids"]).logits - ref["moe"]).abs().max())
out = moe.generate(input_ids=ref["ids"][:1], max_new_tokens=3, do_sample=False)
print("remote", type(moe).__module__, m, tuple(out.shape))
"""


def _run(script: str, *, cwd: Path, endpoint: str, home: Path, with_repo: bool = True) -> str:
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"))
    env["HF_HUB_DISABLE_XET"] = "1"
    env["HF_MODULES_CACHE"] = str(home / "modules")
    if with_repo:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.strip().splitlines()[-1]


def test_push_adapter_and_moe_then_load_both_with_auto_classes_elsewhere(hub_server, tmp_path):
    publisher, user, stranger = (tmp_path / name for name in ("publisher", "user", "stranger"))
    for folder in (publisher, user, stranger):
        folder.mkdir()
    repo_root = str(Path(__file__).parents[1])
    assert _run(PUBLISH, cwd=publisher, endpoint=hub_server.endpoint, home=publisher / "hf") == "published"
    for folder in (user, stranger):
        (folder / "ref.safetensors").write_bytes((publisher / "ref.safetensors").read_bytes())

    line = _run(LOAD.format(adapter=ADAPTER, moe=MOE), cwd=user, endpoint=hub_server.endpoint, home=user / "hf").split()
    assert line[0] == "loaded" and float(line[1]) == 0.0 and float(line[2]) == 0.0, line

    # a user without this project: no PYTHONPATH to it (the venv's editable install points elsewhere, and the
    # assertion in the script checks that neither package was imported)
    line = _run(
        REMOTE_CODE.format(moe=MOE), cwd=stranger, endpoint=hub_server.endpoint, home=stranger / "hf", with_repo=False
    ).split()
    assert line[0] == "remote" and line[1].startswith("transformers_modules") and float(line[2]) == 0.0, line

    api = HfApi(endpoint=hub_server.endpoint)
    moe_files = {f.rfilename for f in api.model_info(MOE).siblings}
    assert {"config.json", "experts.safetensors", "modeling.py", "configuration.py", "layer.py"} <= moe_files
    assert not any(name.startswith("model") and name.endswith(".safetensors") for name in moe_files), moe_files
    moe_config = json.loads(Path(api.hf_hub_download(MOE, "config.json", cache_dir=tmp_path / "c")).read_text())
    assert moe_config["base_model_name_or_path"] == BASE and not moe_config["base_in_repo"]

    adapter_config = json.loads(
        Path(api.hf_hub_download(ADAPTER, "adapter_config.json", cache_dir=tmp_path / "c")).read_text()
    )
    assert adapter_config["base_model_name_or_path"] == BASE and adapter_config["peft_type"] == "SOLORA"

    for repo, kind, library in ((ADAPTER, "adapter", "peft"), (MOE, "moe", "transformers")):
        text = Path(api.hf_hub_download(repo, "README.md", cache_dir=tmp_path / "c")).read_text()
        card = check_card(text, kind=kind)
        assert card.data.library_name == library and card.data.base_model == BASE
        assert "[More Information Needed]" not in text, "a placeholder card was pushed"
        usage = {s.name: s.body for s in parse_sections(card.text)}["usage"]
        (snippet,) = extract_python_snippets(usage)
        assert f'"{repo}"' in snippet
        assert ("import peft_sorlora" if kind == "adapter" else "import moe_router") in snippet
        if kind == "moe":  # the two ways this test loaded it, as the card tells them
            assert f'from_pretrained("{repo}", trust_remote_code=True)' in usage and f"`{BASE}` by its id" in usage

    leaks = ("site-packages", str(tmp_path), repo_root, "/tmp/", os.path.expanduser("~"))
    for repo in (BASE, ADAPTER, MOE):
        folder = Path(api.snapshot_download(repo, cache_dir=tmp_path / "snapshots"))
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                found = [leak for leak in leaks if leak.encode() in data]
                assert not found, f"{repo}/{path.name} carries local path(s) {found}"
