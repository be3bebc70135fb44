"""The run's table states its own resolution and the questions it could not score."""

from __future__ import annotations

from sorlora.evaluation.report import results_table


def _summary(per_question):
    config = {"tasks": ["a", "b"], "peers": 4, "rounds": 1, "local_steps": 2, "batch_size": 8, "rank": 8,
              "sparsity": 0.25, "seed": 0, "max_len": 96}  # fmt: skip
    method = {"accuracy": {"a": 0.5, "b": 1.0}, "average": 0.75, "params_updated": 10,
              "params_transmitted_per_round": 5, "bytes_transmitted": 100, "n_test": {"a": 80, "b": 80},
              "per_question": per_question}  # fmt: skip
    return {"config": config, "base_params": 100, "methods": {"lora": method}}


def test_table_states_detectable_difference_and_skipped_questions():
    skipped = {"a": {"correct": [1, None, 0, None] + [1] * 76}, "b": {"correct": [1] * 80}}
    table = results_table(_summary(skipped))
    assert "detect differences between two methods of about 12 points" in table  # 160 questions, one seed
    assert "do not fit max_len=96 tokens" in table and "a: 2 of 80" in table and "b:" not in table.split("cut):")[1]
    assert "do not fit" not in results_table(_summary({"a": {"correct": [1] * 80}, "b": {"correct": [0] * 80}}))
