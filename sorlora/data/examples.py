"""The data model: a multiple-choice :class:`Example`, a :class:`Task`'s fixed splits, and how pools are split.

Every task becomes lists of :class:`Example` (prompt, option continuations, label) in lm-evaluation-harness style:
the prompt ends without a trailing space and every option is a continuation starting with a space. Splits are
fixed by a seeded hash of the prompt, test first, and test prompts never occur in training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Example", "Pools", "Task", "continuation", "finish_prompt", "hold_out", "split_examples"]


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


def continuation(option: str) -> str:
    """An option as a continuation: stripped, after one space."""
    return " " + option.strip()


def finish_prompt(prompt: str) -> str:
    """A prompt without leading newlines or trailing spaces (its options start with the space)."""
    return prompt.lstrip("\n").rstrip(" ")


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


def hold_out(name: str, kind: str, pools: Pools, *, share: float, seed: int = 0) -> Task:
    """One member's data as its training set and the questions it holds back (``test``): a file's or a source's own
    test pool when it has one, else the first ``share`` of its distinct examples in :func:`split_examples`'s seeded
    hash order (at least one when ``share`` > 0, never all). The training set keeps the data's own order (the order
    a member's batches are drawn from) less every held-back prompt. The same data, share and seed give the same
    split."""
    if not 0 <= share < 1:
        raise ValueError(f"the held-out share must be in [0, 1), got {share!r}")
    if set(pools) == {"train", "test"}:
        test, rest = _dedupe(pools["test"]), pools["train"]
    elif set(pools) == {"all"}:
        distinct = sorted(_dedupe(pools["all"]), key=lambda e: _split_key(seed, e.prompt))
        n = len(distinct)
        test, rest = distinct[: 0 if share == 0 or n < 2 else min(n - 1, max(1, round(share * n)))], pools["all"]
    else:
        raise ValueError(f"task {name!r}: pools must be {{'all'}} or {{'train', 'test'}}, got {sorted(pools)}")
    held = {e.prompt for e in test}
    return Task(name=name, kind=kind, train=[e for e in rest if e.prompt not in held], test=test)
