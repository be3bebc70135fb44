"""Bring your own data: JSONL/CSV task files of multiple-choice items or of (text, label) pairs, checked record by
record (a bad record is one :class:`TaskFileError` naming the file, the line and the field)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .examples import Example, Pools, Task, continuation, finish_prompt, split_examples

__all__ = ["MAX_TASK_FILE_BYTES", "TaskFileError", "classification_prompt", "load_task_file", "read_task_file"]


class TaskFileError(ValueError):
    """A task file holds a bad record; the message names the file, the line and the field."""

    def __init__(self, path: str | Path, line: int, field: str | None, problem: str) -> None:
        where = f"{path}:{line}" + (f": field {field!r}" if field else "")
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.field = str(path), line, field


MAX_TASK_FILE_BYTES = 512 * 2**20  # a task file larger than this is refused (it is read into memory)
_SPLITS = ("train", "test")


@dataclass(frozen=True)
class _Record:
    line: int
    split: str | None
    prompt: str | None = None  # multiple choice: prompt, options, answer
    options: tuple[str, ...] = ()
    answer: Any = None
    text: str | None = None  # classification: text, label
    label: str | None = None


def _file_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of every non-blank record of a JSONL or CSV file."""
    size = path.stat().st_size
    if size > MAX_TASK_FILE_BYTES:
        raise TaskFileError(path, 0, None, f"file is {size} bytes, more than the limit of {MAX_TASK_FILE_BYTES}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise TaskFileError(path, 0, None, f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    suffix = path.suffix.lower()
    rows: list[tuple[int, dict[str, Any]]] = []
    if suffix in (".jsonl", ".ndjson", ".json"):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise TaskFileError(path, number, None, f"not valid JSON ({error.msg}, column {error.colno})") from None
            if not isinstance(row, dict):
                raise TaskFileError(path, number, None, f"a record must be a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        if not reader.fieldnames:
            raise TaskFileError(path, 1, None, "no header row")
        start = 2
        for row in reader:
            if None in row:
                raise TaskFileError(path, start, None, f"{len(row[None])} more cells than the header has columns")
            if any(v is None for v in row.values()):
                missing = [k for k, v in row.items() if v is None]
                raise TaskFileError(path, start, missing[0], "missing cell (fewer cells than header columns)")
            if any(v.strip() for v in row.values()):
                rows.append((start, row))
            start = reader.line_num + 1
    else:
        raise TaskFileError(path, 0, None, f"unknown file type {suffix!r}: use .jsonl or .csv")
    if not rows:
        raise TaskFileError(path, 0, None, "holds no records")
    return rows


def _string_field(path: Path, number: int, row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if value is None else f"got {value!r}"[:80]
        raise TaskFileError(path, number, key, f"must be a non-empty string ({got})")
    return value


def _options_field(path: Path, number: int, row: dict[str, Any]) -> tuple[str, ...]:
    value = row.get("options")
    if isinstance(value, str):  # a CSV cell: a JSON list, or options separated by '|'
        if value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise TaskFileError(path, number, "options", f"not a valid JSON list ({error.msg})") from None
        else:
            value = value.split("|")
    if not isinstance(value, list) or len(value) < 2:
        raise TaskFileError(path, number, "options", f"must be a list of at least 2 options, got {value!r}"[:200])
    options = []
    for i, option in enumerate(value):
        if not isinstance(option, str) or not option.strip():
            raise TaskFileError(path, number, "options", f"option {i} must be a non-empty string, got {option!r}")
        options.append(option.strip())
    if len(set(options)) != len(options):
        raise TaskFileError(path, number, "options", f"options repeat: {options!r}"[:200])
    return tuple(options)


def _answer_index(path: Path, number: int, answer: Any, options: tuple[str, ...]) -> int:
    """The answer as an option index: the option's text, or a 0-based index (an int, or digits in a CSV cell)."""
    if isinstance(answer, str) and answer.strip() in options:
        return options.index(answer.strip())
    if isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer.strip())
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return answer
    raise TaskFileError(
        path, number, "answer", f"must be one of the options or a 0-based index below {len(options)}, got {answer!r}"
    )


def _read_record(path: Path, number: int, row: dict[str, Any]) -> _Record:
    split = row.get("split")
    if split in ("", None):
        split = None
    elif split not in _SPLITS:
        raise TaskFileError(path, number, "split", f"must be one of {_SPLITS} (or absent), got {split!r}")
    if "prompt" in row or "options" in row:
        prompt = _string_field(path, number, row, "prompt")
        options = _options_field(path, number, row)
        if "answer" not in row:
            raise TaskFileError(
                path, number, "answer", "missing (a multiple-choice record has prompt, options, answer)"
            )
        return _Record(number, split, prompt=prompt, options=options, answer=row["answer"])
    if "text" in row or "label" in row:
        text = _string_field(path, number, row, "text")
        label = row.get("label")
        if isinstance(label, (int, float)) and not isinstance(label, bool):
            label = str(label)
        label = _string_field(path, number, {"label": label}, "label")
        return _Record(number, split, text=text, label=label.strip())
    raise TaskFileError(
        path, number, None, f"a record needs fields prompt, options, answer or text, label; got {sorted(row)}"[:200]
    )


def classification_prompt(text: str, labels: Sequence[str]) -> str:
    """The prompt of a (text, label) record: the text, then the question listing the labels."""
    listed = ", ".join(labels[:-1]) + " or " + labels[-1] if len(labels) > 1 else labels[0]
    return f"Text: {' '.join(text.split())}\nAnswer ({listed}):"


def read_task_file(path: str | Path) -> tuple[str, Pools]:
    """Parse a task file into (kind, pools); raise :class:`TaskFileError` on the first bad record.

    A record is either multiple choice ``{"prompt": ..., "options": [...], "answer": option text or 0-based
    index}`` or classification ``{"text": ..., "label": ...}`` (the options are then the file's distinct labels, in
    sorted order). One file holds one kind. An optional ``split`` field ("train" or "test", on every record or on
    none) keeps the file's own split; otherwise examples are split by a seeded hash as every task is. In a CSV file
    the header names the fields and an ``options`` cell is a JSON list or options separated by ``|``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    records = [_read_record(path, n, row) for n, row in _file_rows(path)]
    first = records[0]
    multiple_choice = first.prompt is not None
    for record in records:
        if (record.prompt is not None) != multiple_choice:
            mine, theirs = ("text/label", "prompt/options/answer") if multiple_choice else ("prompt/options/answer",
                                                                                        "text/label")  # fmt: skip
            raise TaskFileError(path, record.line, None, f"a {mine} record in a file of {theirs} records "
                                f"(line {first.line})")  # fmt: skip
        if (record.split is None) != (first.split is None):
            raise TaskFileError(path, record.line, "split", f"set on some records and not others (line {first.line})")
    if multiple_choice:
        examples = [
            (r.split, Example(finish_prompt(r.prompt), tuple(continuation(o) for o in r.options),
                              _answer_index(path, r.line, r.answer, r.options)))
            for r in records
        ]  # fmt: skip
        counts = sorted({len(r.options) for r in records})
        kind = f"{counts[0]}-way multiple choice (file)" if len(counts) == 1 else "multiple choice (file)"
    else:
        labels = sorted({r.label for r in records})
        if len(labels) < 2:
            raise TaskFileError(path, records[-1].line, "label", f"the file has only one label {labels[0]!r}; need 2+")
        options = tuple(continuation(label) for label in labels)
        examples = [
            (r.split, Example(classification_prompt(r.text, labels), options, labels.index(r.label))) for r in records
        ]
        kind = f"{len(labels)}-way classification (file)"
    if first.split is None:
        return kind, {"all": [e for _, e in examples]}
    pools: Pools = {split: [e for s, e in examples if s == split] for split in _SPLITS}
    for split, pool in pools.items():
        if not pool:
            raise TaskFileError(path, records[-1].line, "split", f"no record has split {split!r}")
    return kind, pools


def load_task_file(
    path: str | Path,
    *,
    name: str | None = None,
    n_train: int | None,
    n_test: int,
    n_validation: int = 0,
    seed: int = 0,
) -> Task:
    """Load a JSONL or CSV task file (see :func:`read_task_file`) as a :class:`Task` with a fixed split.

    ``name`` defaults to the file's stem. Bad records raise :class:`TaskFileError` (a ``ValueError``) naming the
    file, the line and the field.
    """
    kind, pools = read_task_file(path)
    return split_examples(
        name or Path(path).stem, kind, pools, n_train=n_train, n_test=n_test, n_validation=n_validation, seed=seed
    )
