"""Workflows: a training run, stages, continual sequences, finished runs, comparisons."""
