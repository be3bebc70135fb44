"""Benchmark suite: ``python -m benchmarks`` (``make bench``) measures SO-LoRA against its anchors in one run.

Entries: train step vs PEFT LoRA, bytes on the wire vs dense LoRA, implicit-MoE latency vs one merged adapter, gossip
round time vs copying the bytes, many peers in one process, and the memory per in-process peer program of a
whole collaboration (`peer_memory`). Results go to ``benchmarks/results/<date>.json/.md``.
"""
