"""One frozen base model, many adapters: loading the base, the workspace, compute precision, the implicit MoE."""
