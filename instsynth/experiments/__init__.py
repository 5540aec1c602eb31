"""Controlled experiments: the dataset of an experiment (the harness itself is instsynth/experiment.py for now)."""
