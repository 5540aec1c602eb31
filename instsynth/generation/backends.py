"""The table of generation backends: ``--mode`` -> its Backend class, imported only when that mode is chosen
(recolor needs neither torch nor diffusers). A new backend is one module plus one entry here."""
from __future__ import annotations

from instsynth.generation.common import MODE_NAMES, Backend


def _recolor():
    from instsynth.generation.recolor import RecolorBackend
    return RecolorBackend


def _diffinpainting():
    from instsynth.generation.diffinpainting import DiffInpaintingBackend
    return DiffInpaintingBackend


def _bld():
    from instsynth.generation.bld import BlendedLatentDiffusionBackend
    return BlendedLatentDiffusionBackend


def _gligen():
    from instsynth.generation.gligen import GligenBackend
    return GligenBackend


def _diffusers():
    from instsynth.generation.auto_inpaint import DiffusersInpaintBackend
    return DiffusersInpaintBackend


BACKENDS = {"recolor": _recolor, "diffinpainting": _diffinpainting, "bld": _bld, "gligen": _gligen,
            "diffusers": _diffusers}


def backend_class(mode: str) -> type[Backend]:
    """The backend class of a mode."""
    if mode not in BACKENDS:
        raise ValueError(f"unknown mode {mode!r}; choose from {sorted(MODE_NAMES)}")
    return BACKENDS[mode]()
