"""The data layer: examples and tasks, the task registry, task files, synthetic tasks, tokenization, pinned sources."""
