"""The training engine: the trainer, its hooks, evaluation, optimizers, feature caching, pictures."""
