"""The dataset of a controlled experiment (``dataset:`` of EXP.yaml): a Cityscapes tree or COCO / LVIS files.

```
dataset: datasets/demo                                  # a Cityscapes tree (train and test splits)
dataset: {coco: data/annotations/instances_{split}.json, images: data/images/{split}}   # COCO / LVIS
dataset: {format: cityscapes, root: datasets/demo}      # the first form, spelled out
```

``{split}`` is replaced by ``train_split`` and ``test_split``; the COCO path needs it (one file per split),
the image folder may be shared. On a COCO dataset every arm's train file is COCO already: the baseline
trains on the file itself, ``duplicate`` repeats its images, and ``copy_paste`` / ``instsynth`` write new
images and a merged file (copy-paste and integration's COCO output) whose new images the harness keeps
(:func:`extra_images_file`); no Cityscapes -> COCO conversion runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instsynth.core.io import InstSynthError, read_json, write_json
from instsynth.formats import Dataset, open_dataset

FORMATS = ("cityscapes", "coco")
KEYS = {"format", "root", "coco", "images", "skip_bad"}


@dataclass(frozen=True)
class ExperimentDataset:
    """Where an experiment's original splits are: ``root`` (Cityscapes) or ``coco`` + ``images`` templates."""

    kind: str = "cityscapes"
    root: Path | None = None
    coco: str | None = None
    images: str | None = None
    skip_bad: bool = False

    @property
    def is_coco(self) -> bool:
        return self.kind == "coco"

    def coco_split(self, split: str) -> tuple[Path, Path]:
        """(instances file, image folder) of a split of a COCO dataset (absolute)."""
        return (Path(self.coco.replace("{split}", split)).resolve(),
                Path(self.images.replace("{split}", split)).resolve())

    def key(self, splits: tuple[str, ...]) -> Any:
        """What fingerprints of arm data record of the dataset (a Cityscapes tree: its path, as before)."""
        if not self.is_coco:
            return str(self.root.resolve())
        return {s: [str(p) for p in self.coco_split(s)] for s in splits}

    def selection_flags(self, split: str) -> list[str]:
        """Stage 1's flags naming the dataset (``process_clean_ver.py``)."""
        if not self.is_coco:
            return ["--train_folder", str(self.root.resolve())]
        json_file, images = self.coco_split(split)
        return ["--coco", str(json_file), "--images", str(images), *(["--skip_bad"] if self.skip_bad else [])]

    def open(self, split: str) -> Dataset:
        """The split as a format-interface Dataset (copy-paste reads it)."""
        if not self.is_coco:
            return open_dataset("cityscapes", self.root)
        return open_dataset("coco", *self.coco_split(split), skip_bad=self.skip_bad)


def parse_dataset(path: Path, value: Any) -> ExperimentDataset:
    """``dataset:`` of an experiment YAML read from ``path`` (module docstring); bad forms raise InstSynthError."""
    if isinstance(value, (str, Path)):
        return ExperimentDataset("cityscapes", Path(value))
    if not isinstance(value, dict):
        raise InstSynthError(path, "dataset must be a Cityscapes root or a mapping {coco: FILE, images: DIR}")
    unknown = sorted(set(value) - KEYS)
    if unknown:
        raise InstSynthError(path, f"unknown key(s) {unknown} in dataset; allowed: {sorted(KEYS)}")
    kind = value.get("format", "coco" if "coco" in value else "cityscapes")
    if kind not in FORMATS:
        raise InstSynthError(path, f"dataset.format must be one of {FORMATS}, got {kind!r} (a folder dataset: "
                                   "export it as COCO first)")
    if kind == "cityscapes":
        if not isinstance(value.get("root"), str):
            raise InstSynthError(path, "dataset.root (the Cityscapes tree) is required with format: cityscapes")
        return ExperimentDataset("cityscapes", Path(value["root"]))
    if not (isinstance(value.get("coco"), str) and isinstance(value.get("images"), str)):
        raise InstSynthError(path, "a COCO dataset needs dataset.coco (instances file) and dataset.images (folder)")
    if "{split}" not in value["coco"]:
        raise InstSynthError(path, f"dataset.coco {value['coco']!r} needs '{{split}}' in its path: the train and "
                                   "test splits are one file each")
    return ExperimentDataset("coco", coco=value["coco"], images=value["images"], skip_bad=bool(value.get("skip_bad")))


def extra_images_file(merged: Path, out: Path) -> Path:
    """Write to ``out`` the new images of a merged COCO file (ids from ``info.instsynth.first_synthetic_image_id``)
    with their annotations: what an arm adds to the baseline's train file."""
    data = read_json(merged)
    first = (data.get("info") or {}).get("instsynth", {}).get("first_synthetic_image_id")  # None: no new image
    images = [im for im in data.get("images", []) if first is not None and im["id"] >= first]
    ids = {im["id"] for im in images}
    return write_json(out, {**data, "images": images,
                            "annotations": [a for a in data.get("annotations", []) if a["image_id"] in ids]},
                      indent=None)
