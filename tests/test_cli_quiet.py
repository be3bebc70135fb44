"""Quiet by default: ``--no-progress`` silences the GGUF de-quantizing bar too (a bare tqdm inside transformers), and
an unreachable hub is one line after its retries, not one warning per retry. (A peer's own output, with and without
its bar, and the absence of any look-up of the public Hub are checked on real peer processes in test_cli_eval.)"""

from __future__ import annotations

import functools
import io
import socket
import subprocess
import sys

from sorlora.cli.quiet import no_library_progress_bars

GGUF_DESC = "Converting and de-quantizing GGUF tensors..."


def test_no_progress_silences_the_gguf_bar_that_the_libraries_switches_miss():
    import huggingface_hub.utils
    import transformers.utils.logging
    from transformers import modeling_gguf_pytorch_utils as gguf

    original = gguf.tqdm  # an earlier `--no-progress` in this process may have silenced it already
    bare = original.func if isinstance(original, functools.partial) else original
    gguf.tqdm = bare
    try:
        transformers.utils.logging.disable_progress_bar()  # the libraries' own switch alone does not reach this bar
        drawn = io.StringIO()
        list(gguf.tqdm(range(3), desc=GGUF_DESC, file=drawn))
        assert GGUF_DESC in drawn.getvalue()
        no_library_progress_bars()
        silent = io.StringIO()
        assert list(gguf.tqdm(range(3), desc=GGUF_DESC, file=silent)) == [0, 1, 2]
        assert silent.getvalue() == ""
        no_library_progress_bars()  # twice is once
        assert gguf.tqdm.func is bare
    finally:
        gguf.tqdm = original
        transformers.utils.logging.enable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()


def test_an_unreachable_hub_is_one_line_after_its_retries():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "sorlora", "collab", "status", "--hub", f"http://127.0.0.1:{port}",
                           "--collab", "lab/c"], capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "the hub is unreachable" in lines[0] and "after 6 attempts" in lines[0], lines


def test_the_warnings_a_run_triggers_by_design_are_hidden_and_others_are_not():
    """PEFT asks every model ``is_gradient_checkpointing``, which transformers deprecated: a FutureWarning in every
    run and study (two per study seed) until :func:`quiet_library_warnings` hides it; other warnings still show."""
    import warnings

    from sorlora.cli.quiet import quiet_library_warnings
    from sorlora.runtime.model_loading import tiny_random_model

    model, _ = tiny_random_model(hidden_size=32)
    with warnings.catch_warnings(record=True) as before:
        warnings.simplefilter("always")
        getattr(model, "is_gradient_checkpointing", True)  # PEFT's own look-up (peft_model.py)
    assert any("is_gradient_checkpointing" in str(w.message) for w in before)
    with warnings.catch_warnings(record=True) as after:
        warnings.simplefilter("always")
        quiet_library_warnings()
        getattr(model, "is_gradient_checkpointing", True)
        warnings.warn("something the user should see", UserWarning, stacklevel=1)
    assert [str(w.message) for w in after] == ["something the user should see"]


def test_study_workers_print_as_quietly_as_the_command(tmp_path):
    """`sorlora study --jobs 2`: the spawned workers inherit neither the command's warning filters nor its switches;
    they get them as the pool's initializer, so only the seeds' one bar is drawn (no FutureWarning, no
    "Writing model shards" bar from transformers' save_pretrained in each worker)."""
    import json

    from .test_simulation_runner import TINY

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY.replace(methods=("lora", "solora"), rounds=1).to_dict()))
    done = subprocess.run([sys.executable, "-m", "sorlora", "study", "--config", str(config), "--seeds", "0,1",
                           "--jobs", "2", "--run-dir", str(tmp_path / "study")],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "seeds (2 at a time, " in done.stderr and "# Study" in done.stdout
    for noise in ("is_gradient_checkpointing", "Writing model shards", "Warning"):
        assert noise not in done.stderr, done.stderr
