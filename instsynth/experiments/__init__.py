"""Controlled experiments: the harness (arms x seeds, the table) and the Simple Copy-Paste control."""
