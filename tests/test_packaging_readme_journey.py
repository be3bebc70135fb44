"""The README's "whole journey in a lab" runs as written (issue 24), with the tiny random Llama as the base.

The README's bash block runs in ``bash -e`` with only three things changed: ``terms.json``'s ``base_model`` (the tiny
model instead of SmolLM2), the port (a free one) and the two members' data files, which the test writes. It starts
``sorlora hub-serve`` with a token per user, creates the collaboration hosting the base, runs two ``sorlora peer``
OS processes at once, shows the status and scores the collaboration's MoE and a member's adapter with ``sorlora
eval``. Then a fresh Python process with only the endpoint and a token runs the README's loading lines against what
the journey published (keeping the block's lab alive for it) and generates. The terms table in the README is the
code's (:func:`sorlora.fields.fields_table`)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sorlora.data.synthetic import synthetic_task
from sorlora.fields import fields_table
from sorlora.protocol.terms import CollabTerms
from sorlora.runtime.model_loading import TINY_BASE_ID
from sorlora.simulation.engines.processes import write_examples

pytestmark = pytest.mark.timeout(900)

README = Path(__file__).parents[1] / "README.md"
SMOLLM = '"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"'
GENERATE = """
for model, tokenizer in ((moe, moe_tokenizer), (adapter, adapter_tokenizer)):
    batch = tokenizer(["Question: which is larger?"], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    print("generated", type(model).__name__, out.shape[1] - batch["input_ids"].shape[1])
"""


def section(title: str) -> str:
    return README.read_text().split(title, 1)[1].split("\n## ", 1)[0]


def journey_script() -> str:
    (code,) = re.findall(r"```bash\n(.*?)```", section("**The whole journey in a lab**").split("<!-- terms-table", 1)[0],
                         re.DOTALL)  # fmt: skip
    return code


def loading_lines() -> str:
    (code,) = re.findall(r"```python\n(.*?)```", section("**Loading what a collaboration made.**"), re.DOTALL)
    return code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_terms_table_is_the_codes():
    table = README.read_text().split("<!-- terms-table -->\n", 1)[1].split("\n<!-- /terms-table -->", 1)[0]
    assert table == fields_table(CollabTerms)


def test_the_readme_journey_runs_as_written(tmp_path):
    script = journey_script()
    assert SMOLLM in script and script.count("8765") == 4, script
    port = free_port()
    script = script.replace(SMOLLM, f'"base_model": "{TINY_BASE_ID}"').replace("8765", str(port))
    script = script.replace("kill $SERVER\n", "")  # the lab stays up for the loading lines below
    for user, task in (("alice", "synthetic-alpha"), ("bob", "synthetic-beta")):
        write_examples(tmp_path / f"{user}.jsonl", synthetic_task(task, n_train=20, n_test=2).train)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT", "SORLORA_HUB")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1",
               HF_HOME=str(tmp_path / "hf-home"))  # fmt: skip
    # the block, then (same shell, same lab) the fresh process that runs the README's loading lines
    loader = tmp_path / "load.py"
    wrapper = (
        script
        + f'\nMOE=$(HF_TOKEN=bob-token-0123456789abcdef sorlora collab status --collab lab/smollm-collab --json | python -c "import json,sys; print(sorted({{m[\'moe\'] for m in json.load(sys.stdin)[\'members\'] if m.get(\'moe\')}})[0])")\nenv -i PATH="$PATH" HOME="$HOME" HF_HOME="{tmp_path}/fresh-hf" HF_ENDPOINT="$HF_ENDPOINT" HF_TOKEN=alice-token-0123456789abcd HF_HUB_DISABLE_XET=1 OMP_NUM_THREADS=1 MOE="$MOE" python {loader}\nkill $SERVER\n'
    )
    loader.write_text("import os\n" + loading_lines().replace('"alice/smollm-collab-moe"', 'os.environ["MOE"]')
                      + GENERATE)  # fmt: skip
    done = subprocess.run(["bash", "-e", "-c", wrapper], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=840)  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, (out[-3000:], done.stderr[-3000:])
    assert re.search(r"collaboration lab/smollm-collab: terms [0-9a-f]{12}", out), out[:2000]
    for user in ("alice", "bob"):
        assert f"peer {user}/smollm-peer: done (3 rounds)" in out, out[-3000:]
        assert f"held-out own adapter {user}/smollm-peer@final: accuracy" in out
        assert "held-out collaboration's MoE" in out
    moe = re.search(r"implicit MoE: (\S+/smollm-collab-moe)", out)
    assert moe, out[-3000:]
    # the two eval lines: the MoE and bob's adapter on bob's held-out share (2 of 20 questions: 10%)
    assert re.search(rf"{re.escape(moe.group(1))}@\S+: accuracy \d+\.\d% \[\d+\.\d, \d+\.\d\], acc_norm .* 2 questions",
                     out), out[-2000:]  # fmt: skip
    assert re.search(r"bob/smollm-peer@final: accuracy \d+\.\d% \[.*2 questions", out), out[-2000:]
    assert out.count("generated") == 2 and "generated ImplicitMoEForCausalLM 3" in out, out[-1500:]
    assert "generated PeftModelForCausalLM 3" in out
    reports = [json.loads(p.read_text()) for p in (tmp_path / "sorlora-peers").glob("*/state.json")]
    assert len(reports) == 2 and all("heldout" in r for r in reports), "each peer kept its held-out scores"
