"""Bring your own data: JSONL and CSV task files become Tasks; a bad record gets one line naming file, line, field."""

from __future__ import annotations

import json

import pytest

from sorlora.data.files import TaskFileError, load_task_file, read_task_file
from sorlora.data.registry import load_task


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _mc_rows(n):
    return [{"prompt": f"What is {i} + 1?", "options": [str(i + 1), str(i + 2), str(i)], "answer": i % 3 and str(i + 1)
             or 0} for i in range(n)]  # fmt: skip


def test_jsonl_multiple_choice_file_becomes_a_task(tmp_path):
    path = _jsonl(tmp_path / "sums.jsonl", _mc_rows(30))
    task = load_task_file(path, n_train=20, n_test=6, n_validation=4, seed=1)
    assert task.name == "sums" and task.kind == "3-way multiple choice (file)"
    assert (len(task.train), len(task.test), len(task.validation)) == (20, 6, 4)
    example = next(e for e in task.train + task.test + task.validation if e.prompt == "What is 4 + 1?")
    assert example.options == (" 5", " 6", " 4") and example.answer == " 5"
    assert not {e.prompt for e in task.test} & {e.prompt for e in task.train + task.validation}
    assert load_task_file(path, n_train=20, n_test=6, n_validation=4, seed=1) == task
    assert load_task_file(path, n_train=20, n_test=6, seed=2).test != task.test, "the split follows the seed"


def test_csv_text_label_pairs_become_a_classification_task(tmp_path):
    path = tmp_path / "reviews.csv"
    lines = ["text,label"] + [f'"review number {i}, {"great" if i % 2 else "awful"}",{"pos" if i % 2 else "neg"}'
                              for i in range(20)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    task = load_task_file(path, name="reviews", n_train=None, n_test=5)
    assert task.kind == "2-way classification (file)" and len(task.train) == 15
    example = next(e for e in task.test + task.train if e.prompt.startswith("Text: review number 3,"))
    assert example.options == (" neg", " pos") and example.answer == " pos"
    assert example.prompt.endswith("Answer (neg or pos):")


def test_csv_multiple_choice_with_options_cell_and_index_answer(tmp_path):
    path = tmp_path / "mc.csv"
    path.write_text('prompt,options,answer\n"Q1?","[""a"", ""b""]",1\nQ2?,x|y|z,z\nQ3?,p|q,0\n')
    kind, pools = read_task_file(path)
    assert kind == "multiple choice (file)"
    labels = {e.prompt: e.answer for e in pools["all"]}
    assert labels == {"Q1?": " b", "Q2?": " z", "Q3?": " p"}


def test_file_split_field_is_kept(tmp_path):
    rows = [{**r, "split": "test" if i < 5 else "train"} for i, r in enumerate(_mc_rows(15))]
    task = load_task_file(_jsonl(tmp_path / "s.jsonl", rows), n_train=None, n_test=5, n_validation=2)
    assert {e.prompt for e in task.test} == {f"What is {i} + 1?" for i in range(5)}
    assert len(task.train) == 8 and len(task.validation) == 2


@pytest.mark.parametrize(
    ("content", "line", "field", "problem"),
    [
        ('{"prompt": "a?", "options": ["x", "y"], "answer": 0}\n{"prompt": "b?", "options": ["x"], "answer": 0}\n',
         2, "options", "at least 2"),
        ('{"prompt": "a?", "options": ["x", "y"], "answer": 0}\n\n{"prompt": "b?", "options": ["x", "y"], '
         '"answer": "z"}\n', 3, "answer", "one of the options"),
        ('{"prompt": "", "options": ["x", "y"], "answer": 0}\n', 1, "prompt", "non-empty string"),
        ('{"prompt": "a?", "options": ["x", "y"]}\n', 1, "answer", "missing"),
        ('{"text": "t", "label": "a"}\n{"text": "u"}\n', 2, "label", "non-empty string"),
        ('{"text": "t", "label": "a"}\n{"prompt": "p", "options": ["x", "y"], "answer": 1}\n', 2, None, "file of"),
        ('{"text": "t", "label": "a"}\n{"text": "u", "label": "a"}\n', 2, "label", "only one label"),
        ('{"text": "t", "label": "a"}\nnot json\n', 2, None, "not valid JSON"),
        ('["a", "b"]\n', 1, None, "JSON object"),
        ('{"question": "q"}\n', 1, None, "needs fields"),
        ('{"text": "t", "label": "a", "split": "dev"}\n', 1, "split", "one of"),
    ],
)  # fmt: skip
def test_bad_jsonl_record_names_file_line_and_field(tmp_path, content, line, field, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(TaskFileError) as caught:
        load_task_file(path, n_train=None, n_test=1)
    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.path, error.line, error.field) == (str(path), line, field)
    message = str(error)
    assert "\n" not in message and message.startswith(f"{path}:{line}") and problem in message
    if field:
        assert f"field {field!r}" in message


def test_bad_csv_record_names_its_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('text,label\n"multi\nline text",a\nok,b\n,c\n')
    with pytest.raises(TaskFileError, match=rf"^{path}:5: field 'text': must be a non-empty string"):
        read_task_file(path)
    path.write_text("text,label\nfine,a\nextra,b,c\n")
    with pytest.raises(TaskFileError, match=rf"^{path}:3: .*more cells"):
        read_task_file(path)


def test_unknown_suffix_missing_and_empty_files_are_refused(tmp_path):
    with pytest.raises(TaskFileError, match="unknown file type"):
        read_task_file(_jsonl(tmp_path / "x.txt", _mc_rows(2)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_task_file(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(TaskFileError, match="no records"):
        read_task_file(tmp_path / "empty.jsonl")


def test_load_task_takes_a_file_path_and_names_the_task_by_it(tmp_path):
    path = str(_jsonl(tmp_path / "sums.jsonl", _mc_rows(12)))
    task = load_task(path, n_train=4, n_test=4, n_validation=2)
    assert task.name == path and len(task.test) == 4
    assert load_task("synthetic-alpha", n_train=8, n_test=4).name == "synthetic-alpha"
    with pytest.raises(ValueError, match="no such file"):
        load_task(str(tmp_path / "missing.jsonl"), n_train=1, n_test=1)


def test_file_tasks_run_in_sorlora_run(tmp_path):
    from sorlora.cli import main

    from .test_simulation_runner import TINY

    files = []
    for k, word in enumerate(("red", "blue")):
        rows = [{"text": f"{word} item {i} {'yes' if (i + k) % 2 else 'no'}", "label": "yes" if (i + k) % 2 else "no"}
                for i in range(24)]  # fmt: skip
        files.append(str(_jsonl(tmp_path / f"{word}.jsonl", rows)))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY.replace(methods=("local",)).to_dict()))
    run_dir = tmp_path / "run"
    code = main(["run", "--config", str(config), "--set", f"tasks={json.dumps(files)}", "--set", "n_train=12",
                 "--set", "n_test=6", "--set", "n_validation=0", "--run-dir", str(run_dir), "--no-progress"])  # fmt: skip
    assert code == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["methods"]["local"]["accuracy"]) == set(files)
    assert results["methods"]["local"]["n_test"] == {f: 6 for f in files}
