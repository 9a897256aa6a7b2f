"""Layer 0: what every other layer uses (errors, registries, processes, checkpoints, run directories)."""
