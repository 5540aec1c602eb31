"""A tiny randomly initialised OneFormer (real transformers classes) for offline tests.

Its sizes come from ``configs/quick_schedules/oneformer_quick.yaml`` (one source of truth);
:func:`build_tiny_oneformer` saves it with ``save_pretrained`` (model + built-in tokenizer) so that
``MODEL.WEIGHTS <folder>`` loads it back by path exactly like a downloaded OneFormer.

``python -m instsynth.testing.tiny_oneformer OUT`` writes it to ``OUT``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from instsynth.core.labels import REPO_ROOT

QUICK_CONFIG = REPO_ROOT / "configs" / "quick_schedules" / "oneformer_quick.yaml"


def tiny_oneformer_cfg(*opts: str):
    """The quick-schedule config (plus ``KEY VALUE`` overrides)."""
    from instsynth.config import load_config

    return load_config(QUICK_CONFIG, list(opts))


def tiny_oneformer(*opts: str, seed: int = 0):
    """A freshly initialised tiny ``instsynth.modeling.oneformer.OneFormer`` (seeded)."""
    import torch

    from instsynth.modeling import build_model

    torch.manual_seed(seed)
    return build_model(tiny_oneformer_cfg(*opts))


def build_tiny_oneformer(out: str | Path, seed: int = 0) -> Path:
    """Save a tiny OneFormer + tokenizer to ``out`` (returned); reuses a finished folder."""
    out = Path(out)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    model = tiny_oneformer(seed=seed)
    model.tokenizer.save_pretrained(out)
    model.oneformer.save_pretrained(out)  # model.safetensors last: its presence marks a finished folder
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write")
    print(build_tiny_oneformer(parser.parse_args().out))
