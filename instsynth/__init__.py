"""InstSynth: synthesise instance-segmentation training data by prompt-guided instance regeneration."""

__version__ = "0.1.0"
