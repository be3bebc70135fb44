"""Synthetic tasks for fast tests with tiny models: generated, learnable, conflicting between task names."""

from __future__ import annotations

import random

from .examples import Example, Task, split_examples

__all__ = ["synthetic_task"]

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
