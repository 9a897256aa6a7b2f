"""Layer 4, the only place that turns a config into objects: data and loaders, tasks, the model, the run."""
