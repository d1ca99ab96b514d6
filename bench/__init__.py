"""Benchmarks: modules.py (forwards against diffusers), cycle.py (one distillation cycle: time, memory, FLOP/s)."""
