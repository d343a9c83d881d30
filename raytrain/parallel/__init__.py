"""Parallelism applied to the model from outside: DeviceMesh layouts, TP, pipeline stages, FSDP2, planning."""
