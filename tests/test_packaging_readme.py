"""The README's quickstart runs as written (on a tiny random model standing in for the bundled SmolLM2)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).parents[1]

# Only the model is swapped: load_base_model() returns a tiny random Llama with the byte-level tokenizer (same
# code paths, instant); everything after the prelude is the README's text verbatim.
PRELUDE = """
import peft_sorlora
from sorlora.runtime.model_loading import tiny_random_model
peft_sorlora.load_base_model = lambda *args, **kwargs: tiny_random_model(hidden_size=64)
"""
CHECK = """
import json, os
kept, total = peft_sorlora.trainable_entries(model)
assert kept == total // 2, (kept, total)
assert neighbour.peft_config["peer3"].layer_sparsity == model.peft_config["default"].layer_sparsity
for name, module in model.named_modules():
    if isinstance(module, peft_sorlora.SOLoRALayer):
        mine = module.effective_B("default")
        theirs = dict(neighbour.named_modules())[name].effective_B("peer3")
        assert torch.count_nonzero(mine) > 0 and torch.equal(mine, theirs), name
assert os.path.isfile("my-adapter/adapter_model.safetensors")
print("quickstart ok")
"""


def quickstart_code() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    return code


def test_readme_quickstart_runs(tmp_path):
    script = textwrap.dedent(PRELUDE) + quickstart_code() + textwrap.dedent(CHECK)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "quickstart ok"


def test_readme_shows_the_study_as_recorded():
    """The README's study section quotes ``results/study/study.md`` line for line: its tables and notes are the
    recorded study's, not numbers edited by hand or left behind when seeds were added."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("#### The study (`sorlora study`)", 1)[1].split("\n#### ", 1)[0]
    recorded = [line for line in (ROOT / "results/study/study.md").read_text().splitlines()[1:] if line.strip()]
    assert len(recorded) > 20, "the study's tables"
    missing = [line for line in recorded if line not in section.splitlines()]
    assert not missing, f"README's study section lacks {len(missing)} line(s) of results/study/study.md: {missing[:3]}"


def test_readme_study_command_names_the_recorded_seeds():
    """The study command in the README runs exactly the seeds ``results/study`` holds: rerunning it as written
    reproduces (resumes) the recorded study rather than a smaller or larger one."""
    import json

    readme = (ROOT / "README.md").read_text()
    section = readme.split("#### The study (`sorlora study`)", 1)[1].split("\n#### ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    (seeds,) = re.findall(r"sorlora study --preset study --seeds ([\d,]+) .*--run-dir runs/study\n", block)
    recorded = json.loads((ROOT / "results/study/study_settings.json").read_text())["seeds"]
    assert [int(s) for s in seeds.split(",")] == recorded
