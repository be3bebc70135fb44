"""Studies built from runs: the multi-seed study, the task pilot and learning-rate tuning (validation only)."""
