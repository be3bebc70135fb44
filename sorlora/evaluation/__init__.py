"""The evaluator: reads back what peers published, scores final models, computes statistics and writes the report."""
