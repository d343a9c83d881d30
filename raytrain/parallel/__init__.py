"""Parallelism applied to the model from outside: data parallel (FSDP2 / DDP)."""
