"""Tests for multiple-choice evaluation: the shared-prompt KV path equals a full forward per option."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from sorlora.data.examples import Example, Task
from sorlora.data.registry import load_task
from sorlora.data.synthetic import synthetic_task
from sorlora.data.tokenization import (
    collate_for_training,
    context_continuation_ids,
    encode_for_training,
    n_special_prefix,
    truncate_context,
)
from sorlora.evaluation.scoring import accuracy_stderr, evaluate, evaluate_many, option_loglikelihoods
from sorlora.runtime.model_loading import tiny_random_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model(hidden_size=32, num_hidden_layers=2, seed=0)


def brute_force_loglikelihoods(model, tokenizer, examples, *, max_len=256):
    """Reference: one unpadded full forward of prompt + option per option, summing the option's token log-probs."""
    results = []
    with torch.no_grad():
        for example in examples:
            pairs = [context_continuation_ids(tokenizer, example.prompt, o) for o in example.options]
            longest = max(len(c) for _, c in pairs)
            scores = []
            for context, continuation in pairs:
                context = truncate_context(context, budget=max_len - longest, n_special=n_special_prefix(tokenizer))
                ids = torch.tensor([context + continuation])
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
                scores.append(sum(logprobs[len(context) - 1 + j, t].item() for j, t in enumerate(continuation)))
            results.append(scores)
    return results


def _mixed_examples():
    task = synthetic_task("gamma", n_train=1, n_test=6, n_options=4)
    return [
        *task.test,
        Example(
            "Q: a much longer prompt than the others, with many more words in it\nA:", (" yes", " no way at all"), 0
        ),
        Example("x", (" a", " bb", " ccc dd"), 2),
    ]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_kv_reuse_equals_full_forward_per_option(tiny, batch_size):
    model, tokenizer = tiny
    examples = _mixed_examples()
    got = option_loglikelihoods(model, tokenizer, examples, batch_size=batch_size)
    expected = brute_force_loglikelihoods(model, tokenizer, examples)
    assert [len(g) for g in got] == [len(e.options) for e in examples]
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-4)


def test_prompts_are_cut_from_the_left_to_max_len(tiny):
    model, tokenizer = tiny
    examples = _mixed_examples()
    got = option_loglikelihoods(model, tokenizer, examples, batch_size=4, max_len=20)
    assert got != option_loglikelihoods(model, tokenizer, examples, batch_size=4, max_len=256)
    for g, e in zip(got, brute_force_loglikelihoods(model, tokenizer, examples, max_len=20)):
        assert g == pytest.approx(e, abs=1e-4)


def test_kv_reuse_through_a_peft_model(tiny):
    model, tokenizer = tiny_random_model(hidden_size=32, num_hidden_layers=2, seed=1)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    examples = _mixed_examples()
    got = option_loglikelihoods(peft_model, tokenizer, examples, batch_size=4)
    for g, e in zip(got, brute_force_loglikelihoods(peft_model, tokenizer, examples)):
        assert g == pytest.approx(e, abs=1e-4)
    with peft_model.disable_adapter():
        base = option_loglikelihoods(peft_model, tokenizer, examples, batch_size=4)
    assert base != got


def test_accuracy_follows_the_labels_the_model_prefers(tiny):
    model, tokenizer = tiny
    examples = _mixed_examples()
    scores = brute_force_loglikelihoods(model, tokenizer, examples)
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    worst = [min(range(len(s)), key=s.__getitem__) for s in scores]

    def task_with(labels):
        return Task(
            "constructed", "k", train=[], test=[Example(e.prompt, e.options, y) for e, y in zip(examples, labels)]
        )

    assert evaluate(model, tokenizer, task_with(best))["accuracy"] == 1.0
    result = evaluate(model, tokenizer, task_with(worst))
    assert result["accuracy"] == 0.0 and result["n_correct"] == 0 and result["n"] == len(examples)
    half = best[:4] + worst[4:]
    result = evaluate(model, tokenizer, task_with(half), batch_size=3)
    assert result["accuracy"] == pytest.approx(4 / len(examples))
    assert result["stderr"] == pytest.approx(accuracy_stderr(4 / len(examples), len(examples)))


def test_acc_norm_divides_by_option_length(tiny):
    model, tokenizer = tiny
    # A long option has a much lower summed log-likelihood; per character it can win.
    example = Example("Q: pick\nA:", (" a", " " + "abcdefgh" * 4), 1)
    (scores,) = brute_force_loglikelihoods(model, tokenizer, [example])
    result = evaluate(model, tokenizer, Task("norm", "k", train=[], test=[example]))
    assert result["accuracy"] == float(scores[1] > scores[0])
    assert result["acc_norm"] == float(scores[1] / len(example.options[1]) > scores[0] / len(example.options[0]))


def test_a_briefly_trained_tiny_model_learns_a_synthetic_task():
    torch.manual_seed(0)
    model, tokenizer = tiny_random_model(hidden_size=64, num_hidden_layers=2, seed=2)
    task = synthetic_task("delta", n_train=256, n_test=64, n_options=2)
    before = evaluate(model, tokenizer, task)["accuracy"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    encoded = [encode_for_training(e, tokenizer, max_len=64) for e in task.train]
    for step in range(120):
        batch = collate_for_training(
            [encoded[(step * 16 + i) % len(encoded)] for i in range(16)], pad_token_id=tokenizer.pad_token_id
        )
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = evaluate(model, tokenizer, task)
    assert model.training  # evaluate restores the mode it found
    assert after["accuracy"] >= 0.85 > before + 0.2, (before, after)


def test_evaluate_many_and_bad_input(tiny):
    model, tokenizer = tiny
    tasks = [synthetic_task("one", n_train=1, n_test=5), synthetic_task("two", n_train=1, n_test=7, n_options=3)]
    results = evaluate_many(model, tokenizer, tasks, batch_size=4)
    assert list(results) == ["one", "two"] and [r["n"] for r in results.values()] == [5, 7]
    assert all(0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0 for r in results.values())
    generative = Task("gen", "k", train=[], test=[Example("Question: 1+1?\nAnswer:", (" 2",), 0)])
    with pytest.raises(ValueError, match="not multiple choice"):
        evaluate(model, tokenizer, generative)
    with pytest.raises(ValueError, match="no test examples"):
        evaluate(model, tokenizer, Task("empty", "k", train=[], test=[]))
    with pytest.raises(ValueError, match="batch_size"):
        option_loglikelihoods(model, tokenizer, tasks[0].test, batch_size=0)
    assert math.isnan(accuracy_stderr(1.0, 1))


@pytest.mark.slow
def test_real_smollm2_on_a_slice_of_a_real_task():
    from peft_sorlora.base_model import load_base_model

    torch.set_num_threads(2)
    model, tokenizer = load_base_model()
    assert model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct" and model.hf_quantizer is None
    assert model.config._name_or_path == model.name_or_path and not hasattr(model.config, "quantization_config")
    task = load_task("word_polarity", n_train=0, n_test=10)
    result = evaluate(model, tokenizer, task, batch_size=8, max_len=128)
    assert result["n"] == 10 and 0 <= result["n_correct"] <= 10
    assert result["accuracy"] == result["n_correct"] / 10
    got = option_loglikelihoods(model, tokenizer, task.test[:3], max_len=128)
    for g, e in zip(got, brute_force_loglikelihoods(model, tokenizer, task.test[:3], max_len=128)):
        assert g == pytest.approx(e, abs=2e-3)


def test_truncated_questions_are_skipped_and_counted_never_scored_silently(tiny, caplog):
    from sorlora.evaluation.scoring import PromptTooLongError, fits, question_length

    model, tokenizer = tiny
    examples = _mixed_examples()
    lengths = [question_length(e, tokenizer) for e in examples]
    max_len = sorted(lengths)[len(lengths) // 2]  # about half the questions fit
    fit = fits(examples, tokenizer, max_len=max_len)
    assert 0 < fit.count(False) < len(examples)
    task = Task("long", "k", train=[], test=examples)
    with caplog.at_level("WARNING", logger="sorlora.evaluation"):
        skipped = evaluate(model, tokenizer, task, max_len=max_len)
    assert skipped["n_truncated"] == fit.count(False) and skipped["n"] == fit.count(True)
    assert [c is not None for c in skipped["correct"]] == fit
    assert "do not fit max_len" in caplog.text and "skipped" in caplog.text
    fitting = Task("fit", "k", train=[], test=[e for e, ok in zip(examples, fit) if ok])
    alone = evaluate(model, tokenizer, fitting, max_len=max_len)
    assert alone["correct"] == [c for c in skipped["correct"] if c is not None], "same scores for the same questions"
    assert skipped["accuracy"] == alone["accuracy"] and alone["n_truncated"] == 0
    with pytest.raises(PromptTooLongError, match=f"{fit.count(False)} of {len(examples)} test questions"):
        evaluate(model, tokenizer, task, max_len=max_len, truncation="raise")
    cut = evaluate(model, tokenizer, task, max_len=max_len, truncation="cut")
    assert cut["n"] == len(examples) and cut["n_truncated"] == fit.count(False) and None not in cut["correct"]
    with pytest.raises(PromptTooLongError, match="raise max_len"):
        evaluate(model, tokenizer, task, max_len=min(lengths) - 1)  # nothing fits: skipping would score nothing
    with pytest.raises(ValueError, match="truncation must be"):
        evaluate(model, tokenizer, task, truncation="ignore")


def test_per_question_outcomes_match_the_accuracies(tiny):
    model, tokenizer = tiny
    task = synthetic_task("eps", n_train=1, n_test=12, n_options=3)
    result = evaluate(model, tokenizer, task, batch_size=5)
    assert len(result["correct"]) == len(result["correct_norm"]) == 12 and result["n_truncated"] == 0
    assert sum(result["correct"]) == result["n_correct"] and result["accuracy"] == result["n_correct"] / 12
    assert sum(result["correct_norm"]) / 12 == result["acc_norm"]


def test_truncation_report_counts_every_split(tiny):
    from sorlora.evaluation.scoring import question_length, training_length, truncation_report

    _, tokenizer = tiny
    task = synthetic_task("zeta", n_train=10, n_test=6, n_validation=4)
    lengths = sorted(question_length(e, tokenizer) for e in task.test)
    report = truncation_report({"zeta": task}, tokenizer, max_len=lengths[2])
    test = report["zeta"]["test"]
    assert (
        test["n"] == 6
        and test["truncated"] == sum(n > lengths[2] for n in lengths)
        and test["max_tokens"] == lengths[-1]
    )
    assert report["zeta"]["validation"]["n"] == 4
    assert report["zeta"]["train"]["max_tokens"] == max(training_length(e, tokenizer) for e in task.train)
    assert truncation_report({"zeta": task}, tokenizer, max_len=512)["zeta"]["test"]["truncated"] == 0


def test_per_question_means_over_models_keep_skipped_questions_skipped():
    from sorlora.evaluation.scoring import mean_per_question

    a = {"t": {"correct": [1, 0, None], "correct_norm": [1, 1, None]}}
    b = {"t": {"correct": [1, 1, None], "correct_norm": [0, 1, None]}}
    assert mean_per_question([a, b]) == {"t": {"correct": [1.0, 0.5, None], "correct_norm": [0.5, 1.0, None]}}
    with pytest.raises(ValueError, match="at least one"):
        mean_per_question([])
