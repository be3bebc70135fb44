"""Multiple-choice log-likelihood accuracy, as lm-evaluation-harness computes it (acc and length-normalised acc_norm).

Each question's prompt runs once; its key/value cache is copied to every option, so the options' tokens are the only
extra work. An implicit MoE with a per-prompt router (``sequence``, ``spectral``) chooses its experts from the prompt
alone, at that first forward, and keeps the choice for the options (``reorder_routing`` follows the cache's copy). Several questions are batched together (prompts left-padded, options right-padded).

A question whose prompt and longest option do not fit in ``max_len`` tokens is never scored silently: by default it
is skipped and counted (``n_truncated`` in every result, with one warning per task), or the evaluation raises
(``truncation="raise"``), or — only when asked for — the prompt is cut from the left and the count still reported
(``truncation="cut"``). Which questions fit depends on the tokenizer and ``max_len`` only, never on the model, so
every method of a run is scored on the same questions and per-question comparisons stay paired.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..data.examples import Example, Task
from ..data.tokenization import context_continuation_ids, n_special_prefix, truncate_context
from ..runtime.precision import autocast

logger = logging.getLogger(__name__)

TRUNCATION_POLICIES = ("skip", "raise", "cut")


class PromptTooLongError(ValueError):
    """Test prompts do not fit the sequence length and the policy does not allow scoring them."""


def question_length(example: Example, tokenizer: Any) -> int:
    """Tokens a multiple-choice question needs: its prompt (with special tokens) plus its longest option."""
    pairs = [context_continuation_ids(tokenizer, example.prompt, option) for option in example.options]
    context = min(len(c) for c, _ in pairs)
    return context + max(len(c) - context + len(o) for c, o in pairs)


def training_length(example: Example, tokenizer: Any) -> int:
    """Tokens a training example needs: its prompt (with special tokens) plus its answer."""
    context, answer = context_continuation_ids(tokenizer, example.prompt, example.answer)
    return len(context) + len(answer)


def fits(examples: Sequence[Example], tokenizer: Any, *, max_len: int) -> list[bool]:
    """Per question: does it fit in ``max_len`` tokens without cutting its prompt?"""
    return [question_length(e, tokenizer) <= max_len for e in examples]


def truncation_report(tasks: Mapping[str, Task], tokenizer: Any, *, max_len: int) -> dict[str, dict[str, Any]]:
    """Per task and split: how many prompts do not fit ``max_len`` (test/validation: question + longest option;
    train: prompt + answer, whose prompt training cuts from the left), and the longest length seen."""
    report: dict[str, dict[str, Any]] = {}
    for name, task in tasks.items():
        report[name] = {}
        for split, examples, length in (
            ("test", task.test, question_length),
            ("validation", task.validation, question_length),
            ("train", task.train, training_length),
        ):
            lengths = [length(e, tokenizer) for e in examples]
            report[name][split] = {
                "n": len(lengths),
                "truncated": sum(n > max_len for n in lengths),
                "max_tokens": max(lengths, default=0),
            }
    return report


_warned: set[tuple[str, int, int]] = set()


def _encode_question(example: Example, tokenizer: Any, *, max_len: int, n_special: int):
    pairs = [context_continuation_ids(tokenizer, example.prompt, option) for option in example.options]
    # The options share the prompt; a tokenizer that merges across the boundary differently per option would break
    # that, so the shortest context is the shared one and any leftover prompt tokens start the continuation.
    context = min((c for c, _ in pairs), key=len)
    continuations = [c[len(context) :] + o for c, o in pairs]
    if any(c[: len(context)] != context for c, _ in pairs):
        raise ValueError(f"options of one question tokenize the prompt differently: {example.prompt[-80:]!r}")
    longest = max(len(c) for c in continuations)
    if longest >= max_len:
        raise ValueError(f"an option of {longest} tokens does not fit in max_len={max_len}")
    return truncate_context(context, budget=max_len - longest, n_special=n_special), continuations


@torch.inference_mode()
def option_loglikelihoods(
    model: torch.nn.Module, tokenizer: Any, examples: Sequence[Example], *, batch_size: int = 8, max_len: int = 256
) -> list[list[float]]:
    """Sum of token log-probabilities of every option given its prompt, per example (prompt cut from the left)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an eos token to pad with")
    n_special = n_special_prefix(tokenizer)
    device = next(model.parameters()).device
    results: list[list[float]] = []
    for start in range(0, len(examples), batch_size):
        encoded = [
            _encode_question(e, tokenizer, max_len=max_len, n_special=n_special)
            for e in examples[start : start + batch_size]
        ]
        results.extend(_score_batch(model, encoded, pad_id=pad_id, device=device))
    return results


def _score_batch(model, encoded, *, pad_id: int, device) -> list[list[float]]:
    contexts = [c for c, _ in encoded]
    width = max(len(c) for c in contexts)
    # Prompts, left-padded so that every row's last position is its last real token.
    input_ids = torch.tensor([[pad_id] * (width - len(c)) + c for c in contexts], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=device)
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids, attention_mask=prompt_mask, position_ids=position_ids, use_cache=True, logits_to_keep=1
    )
    first_logprobs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    # One row per (question, option): copy each question's cache to its options.
    rows = [(q, cont) for q, (_, continuations) in enumerate(encoded) for cont in continuations]
    index = torch.tensor([q for q, _ in rows], device=device)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    cache.reorder_cache(index)
    reorder = getattr(model, "reorder_routing", None)
    if callable(reorder):  # a router that chose per prompt (moe_router: sequence, spectral) keeps it for its options
        reorder(index)
    cont_width = max(len(c) for _, c in rows)
    cont_ids = torch.tensor([c + [pad_id] * (cont_width - len(c)) for _, c in rows], device=device)
    cont_mask = torch.tensor([[1] * len(c) + [0] * (cont_width - len(c)) for _, c in rows], device=device)
    lengths = torch.tensor([len(c) for c in contexts], device=device)
    scores = first_logprobs[index].gather(1, cont_ids[:, :1]).squeeze(1)
    if cont_width > 1:
        cont_out = model(
            input_ids=cont_ids[:, :-1],
            attention_mask=torch.cat([prompt_mask[index], cont_mask[:, :-1]], dim=1),
            position_ids=lengths[index, None] + torch.arange(cont_width - 1, device=device),
            use_cache=True,
            **{_cache_argument(model): cache},
        )
        token_logprobs = torch.log_softmax(cont_out.logits.float(), dim=-1).gather(2, cont_ids[:, 1:, None]).squeeze(2)
        scores = scores + (token_logprobs * cont_mask[:, 1:]).sum(dim=1)
    per_question: list[list[float]] = [[] for _ in encoded]
    for (q, _), score in zip(rows, scores.tolist()):
        per_question[q].append(score)
    return per_question


def _cache_argument(model: torch.nn.Module) -> str:
    """The forward keyword for a KV cache: ``cache`` in recent transformers 5.x, ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(type(base).forward).parameters
    if "cache" in params:
        return "cache"
    inner = getattr(base, "model", None)  # a wrapper passing **kwargs on to the model it wraps (the implicit MoE)
    if isinstance(inner, torch.nn.Module) and any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return _cache_argument(inner)
    return "past_key_values"


def accuracy_stderr(accuracy: float, n: int) -> float:
    """Standard error of a mean of n 0/1 outcomes (sample standard deviation / sqrt(n), as lm-eval reports)."""
    return math.sqrt(accuracy * (1 - accuracy) / (n - 1)) if n > 1 else float("nan")


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    *,
    batch_size: int = 8,
    max_len: int = 256,
    truncation: str = "skip",
    precision: str = "float32",
) -> dict[str, Any]:
    """Zero-shot multiple-choice accuracy of ``model`` on ``task.test``, computed at ``precision``
    (sorlora/runtime/precision.py; log-probabilities are always taken in float32).

    Returns accuracy (highest summed log-likelihood), acc_norm (log-likelihood per character of the option, as
    lm-eval's acc_norm), n (questions scored), n_correct, n_truncated (questions that do not fit ``max_len``),
    truncation (the policy, see the module docstring), stderr (of accuracy), seconds, and per question in test
    order ``correct`` / ``correct_norm`` (1, 0, or None for a skipped question) for paired comparisons.
    """
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
    examples = task.test
    if not examples:
        raise ValueError(f"task {task.name!r} has no test examples")
    single = [e for e in examples if len(e.options) < 2]
    if single:
        raise ValueError(f"task {task.name!r} is not multiple choice: {len(single)} test examples have < 2 options")
    fit = fits(examples, tokenizer, max_len=max_len)
    n_truncated = fit.count(False)
    if n_truncated and (truncation == "raise" or n_truncated == len(examples) and truncation == "skip"):
        raise PromptTooLongError(
            f"task {task.name!r}: {n_truncated} of {len(examples)} test questions do not fit max_len={max_len} "
            "tokens: raise max_len or shorten the prompts"
        )
    if n_truncated and truncation == "skip" and (task.name, max_len, len(examples)) not in _warned:
        _warned.add((task.name, max_len, len(examples)))
        logger.warning("task %r: %d of %d test questions do not fit max_len=%d; they are skipped (not scored)",
                       task.name, n_truncated, len(examples), max_len)  # fmt: skip
    scored = [i for i, ok in enumerate(fit) if ok or truncation == "cut"]
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    try:
        with autocast(precision, next(model.parameters()).device):
            loglikelihoods = option_loglikelihoods(
                model, tokenizer, [examples[i] for i in scored], batch_size=batch_size, max_len=max_len
            )
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - started
    correct: list[int | None] = [None] * len(examples)
    correct_norm: list[int | None] = [None] * len(examples)
    for i, scores in zip(scored, loglikelihoods):
        example = examples[i]
        correct[i] = int(_argmax(scores) == example.label)
        normalised = [s / len(o) for s, o in zip(scores, example.options)]
        correct_norm[i] = int(_argmax(normalised) == example.label)
    n = len(scored)
    n_correct = sum(c for c in correct if c is not None)
    return {
        "accuracy": n_correct / n,
        "acc_norm": sum(c for c in correct_norm if c is not None) / n,
        "n": n,
        "n_correct": n_correct,
        "n_truncated": n_truncated,
        "truncation": truncation,
        "stderr": accuracy_stderr(n_correct / n, n),
        "seconds": seconds,
        "correct": correct,
        "correct_norm": correct_norm,
    }


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def evaluate_many(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Iterable[Task],
    *,
    batch_size: int = 8,
    max_len: int = 256,
    truncation: str = "skip",
    precision: str = "float32",
) -> dict[str, dict[str, Any]]:
    """:func:`evaluate` on every task's test split: {task name: result}."""
    kw = dict(batch_size=batch_size, max_len=max_len, truncation=truncation, precision=precision)
    return {t.name: evaluate(model, tokenizer, t, **kw) for t in tasks}


def per_question(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, list[float | None]]]:
    """{task: {"correct": [...], "correct_norm": [...]}} from :func:`evaluate` results (for paired statistics)."""
    return {t: {"correct": list(r["correct"]), "correct_norm": list(r["correct_norm"])} for t, r in results.items()}


def mean_per_question(
    outcomes: Sequence[Mapping[str, Mapping[str, Sequence[float | None]]]],
) -> dict[str, dict[str, list[float | None]]]:
    """Per question, the mean over several models' :func:`per_question` outcomes (e.g. every peer's own model);
    a question skipped for truncation (None) is skipped for all of them."""
    if not outcomes:
        raise ValueError("need the outcomes of at least one model")
    out: dict[str, dict[str, list[float | None]]] = {}
    for task, first in outcomes[0].items():
        out[task] = {}
        for key in first:
            columns = zip(*(o[task][key] for o in outcomes))
            out[task][key] = [None if None in c else float(sum(c)) / len(c) for c in columns]
    return out
