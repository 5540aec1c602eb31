"""Cityscapes label helpers and the prompt bank.

The label table itself comes from ``cityscapesscripts.helpers.labels``; this module only derives
what the pipeline needs from it (thing classes, evaluated classes, instance-id encoding, colours).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import id2label, labels, name2label

INSTANCE_ID_OFFSET = 1000
"""Cityscapes encodes instance pixels as ``labelId * 1000 + k`` (k counts from 0)."""

THING_CLASSES: tuple[str, ...] = tuple(l.name for l in labels if l.hasInstances and l.id >= 0)
"""The ten Cityscapes classes with instances, in label-id order (person ... bicycle)."""

EVAL_THING_CLASSES: tuple[str, ...] = tuple(n for n in THING_CLASSES if not name2label[n].ignoreInEval)
"""The eight thing classes scored by the Cityscapes benchmark (caravan and trailer are ignored)."""

THING_LABEL_IDS: tuple[int, ...] = tuple(name2label[n].id for n in THING_CLASSES)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROMPTS = REPO_ROOT / "configs" / "prompts.yaml"


def label_id(name: str) -> int:
    """Cityscapes label id of a class name (``"car"`` -> 26)."""
    try:
        return name2label[name].id
    except KeyError:
        raise KeyError(f"unknown Cityscapes class {name!r}; known: {sorted(name2label)}") from None


def class_name(label_id_: int) -> str:
    """Class name of a Cityscapes label id (26 -> ``"car"``)."""
    return id2label[int(label_id_)].name


def encode_instance_id(label_id_: int, index: int) -> int:
    """Instance-id value of the ``index``-th instance of a class: ``labelId * 1000 + index``."""
    if not 0 <= index < INSTANCE_ID_OFFSET:
        raise ValueError(f"instance index {index} out of range [0, {INSTANCE_ID_OFFSET})")
    return int(label_id_) * INSTANCE_ID_OFFSET + int(index)


def decode_instance_id(value: int) -> tuple[int, int | None]:
    """Split an instanceIds value into (label id, instance index); index is None below 1000."""
    value = int(value)
    if value >= INSTANCE_ID_OFFSET:
        return value // INSTANCE_ID_OFFSET, value % INSTANCE_ID_OFFSET
    return value, None


def is_instance(value: int) -> bool:
    """True for an individual thing instance (``value >= 1000``)."""
    return int(value) >= INSTANCE_ID_OFFSET


def is_group_region(value: int) -> bool:
    """True for a thing-class value below 1000: a crowd/group region without an instance."""
    return int(value) in THING_LABEL_IDS


def instance_ids_to_label_ids(instance_ids: np.ndarray) -> np.ndarray:
    """labelIds map of an instanceIds map (``// 1000`` where >= 1000, unchanged elsewhere)."""
    inst = np.asarray(instance_ids)
    return np.where(inst >= INSTANCE_ID_OFFSET, inst // INSTANCE_ID_OFFSET, inst).astype(np.uint8)


@lru_cache(maxsize=1)
def _color_lut() -> np.ndarray:
    lut = np.zeros((256, 3), np.uint8)
    for lab in labels:
        if 0 <= lab.id < 256:
            lut[lab.id] = lab.color
    return lut


def colorize(label_ids: np.ndarray) -> np.ndarray:
    """RGB image (H, W, 3, uint8) of a labelIds map in the official Cityscapes colours."""
    return _color_lut()[np.asarray(label_ids, dtype=np.uint8)]


def load_prompt_bank(path: str | Path | None = None, classes=()) -> tuple[str, dict[str, list[str]]]:
    """Load ``(template, {class: [prompt, ...]})`` from the prompts YAML (default configs/prompts.yaml).

    Class names must be Cityscapes names or among ``classes`` (a COCO dataset's category names)."""
    from .io import InstSynthError, read_yaml

    path = Path(path or DEFAULT_PROMPTS)
    data = read_yaml(path, "prompt bank not found")
    template, prompts = data.get("template"), data.get("prompts")
    if not isinstance(template, str) or "{}" not in template:
        raise InstSynthError(path, "'template' must be a string containing '{}'")
    if not isinstance(prompts, dict) or not all(isinstance(v, list) and v for v in prompts.values()):
        raise InstSynthError(path, "'prompts' must map each class name to a non-empty list")
    unknown = sorted(set(prompts) - set(name2label) - set(classes))
    if unknown:
        raise InstSynthError(path, f"unknown class names {unknown}")
    return template, {k: [str(p) for p in v] for k, v in prompts.items()}


def render_prompt(template: str, prompt: str) -> str:
    """Fill the template: ``render_prompt("a photo of {}", "a red car")`` -> ``"a photo of a red car"``."""
    return template.format(prompt)


PROMPT_COLOURS = ("red", "white", "black", "blue", "green", "yellow", "grey", "brown")
"""Colours of the prompts generated for classes without an entry in the prompt bank."""


def category_phrase(name: str, synonyms=None) -> str:
    """Readable noun of a category: its first synonym (LVIS) or name, ``_`` as spaces, ``(...)`` dropped.

    ``category_phrase("bow_(weapon)")`` -> ``"bow"``; ``category_phrase("x", ["school_bus"])`` -> ``"school bus"``."""
    import re

    text = next((s for s in (synonyms or []) if isinstance(s, str) and s.strip()), name)
    text = re.sub(r"\([^)]*\)", " ", text).replace("_", " ")
    return " ".join(text.split()) or name


def generated_prompts(name: str, synonyms=None) -> list[str]:
    """Prompts for a class the bank does not know: ``"a red <phrase>"``, ``"a white <phrase>"``, ...

    One is picked per instance with the instance's seed, like the bank's own prompts."""
    phrase = category_phrase(name, synonyms)
    return [f"a {colour} {phrase}" for colour in PROMPT_COLOURS]


def complete_prompt_bank(bank: dict[str, list[str]], categories: list[dict], strict: bool = False,
                         where: str | Path = DEFAULT_PROMPTS) -> dict[str, list[str]]:
    """The bank plus :func:`generated_prompts` for every category (``{"name", "synonyms"?}``) it lacks.

    With ``strict`` a missing class is an InstSynthError listing all of them instead."""
    from .io import InstSynthError

    missing = [c for c in categories if c["name"] not in bank]
    if strict and missing:
        raise InstSynthError(where, f"no prompts for classes {sorted(c['name'] for c in missing)}; add them to the "
                                    "prompt bank or drop --strict-prompts to generate 'a <colour> <class>' prompts")
    return {**bank, **{c["name"]: generated_prompts(c["name"], c.get("synonyms")) for c in missing}}


def prompt_bank_with_gaps(meta: dict, path: str | Path | None = None, strict: bool = False
                          ) -> tuple[str, dict[str, list[str]], list[str]]:
    """``(template, bank, generated)``: the bank file, completed for a COCO dataset's categories, and
    the sorted names of the classes whose prompts were generated because the file lacks them."""
    categories = meta.get("categories") if meta.get("format") == "coco" else None
    template, bank = load_prompt_bank(path, [c["name"] for c in categories or []])
    if categories is None:
        return template, bank, []
    generated = sorted(c["name"] for c in categories if c["name"] not in bank)
    return template, complete_prompt_bank(bank, categories, strict, path or DEFAULT_PROMPTS), generated


def prompt_bank_for(meta: dict, path: str | Path | None = None, strict: bool = False
                    ) -> tuple[str, dict[str, list[str]]]:
    """``(template, bank)`` for a stage-1 metadata: the bank file, completed for a COCO dataset's categories."""
    template, bank, _ = prompt_bank_with_gaps(meta, path, strict)
    return template, bank
