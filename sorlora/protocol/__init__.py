"""One device's collaboration: the terms, the collaboration repo, the plan, its checkpoints, publishing, the program."""
