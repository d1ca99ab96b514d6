"""The toy world: a CPU-sized copy of the paper's setting (world.py), its models (train.py), its table (table.py)."""
