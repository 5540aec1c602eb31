"""Dataset registry: a name (``cityscapes_fine_instance_seg_train``) -> image root + COCO JSON + metadata.

Roots of the built-in Cityscapes names are ``$INSTSYNTH_DATASETS`` (default ``datasets/``) joined
with ``cityscapes`` (original Cityscapes) or ``cityscapes_instsynth`` (original + synthetic tree,
the output of ``move_folder_clean_ver.py``); ``$INSTSYNTH_CITYSCAPES`` / ``$INSTSYNTH_CITYSCAPES_INSTSYNTH``
name either tree directly. Each needs the COCO file written by
``cityscapes-to-coco-conversion/main_defined_clean_ver.py``:
``<root>/annotations/instancesonly_filtered_gtFine_<split>.json``.

Your own COCO datasets are registered by name in a YAML catalog named by ``$INSTSYNTH_CATALOG``
(several files separated by ``:``): ``NAME: {json_file: PATH, image_root: DIR}`` per dataset, paths
relative to the catalog file; or in Python with :func:`register_coco_instances`.

The ``cityscapes_demo_*`` names build the demo dataset and its COCO files on first use in
``$INSTSYNTH_DEMO_DIR`` (default ``~/.cache/instsynth/demo``), so quick configs run on a fresh clone.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

from instsynth.core.io import InstSynthError, get_logger, read_yaml

log = get_logger("instsynth.data")

DEMO_SIZE = (512, 256)
"""Width, height of the demo images built for the quick configs."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where a registered dataset lives; ``prepare`` (optional) creates missing files first."""
    name: str
    json_file: Path
    image_root: Path
    dataset_root: Path | None = None  # Cityscapes tree root (for the official evaluation), if any
    split: str | None = None
    prepare: Callable[[], None] | None = field(default=None, compare=False)


_REGISTRY: dict[str, Callable[[], DatasetSpec]] = {}


def datasets_root() -> Path:
    """Folder holding the Cityscapes trees: ``$INSTSYNTH_DATASETS`` or ``datasets/``."""
    return Path(os.environ.get("INSTSYNTH_DATASETS", "datasets"))


def tree_root(folder: str) -> Path:
    """Root of a Cityscapes tree: ``$INSTSYNTH_<FOLDER>`` (e.g. ``INSTSYNTH_CITYSCAPES_INSTSYNTH``) if set,
    else ``datasets_root() / folder``."""
    return Path(os.environ.get(f"INSTSYNTH_{folder.upper()}") or datasets_root() / folder)


def demo_root() -> Path:
    """Cache folder of the demo tree: ``$INSTSYNTH_DEMO_DIR`` or ``~/.cache/instsynth/demo``."""
    default = Path.home() / ".cache" / "instsynth" / "demo"
    return Path(os.environ.get("INSTSYNTH_DEMO_DIR", default)) / f"cityscapes_{DEMO_SIZE[0]}x{DEMO_SIZE[1]}"


def register_dataset(name: str, make_spec: Callable[[], DatasetSpec]) -> None:
    """Register ``name``; ``make_spec`` is called on use (so environment variables apply late)."""
    _REGISTRY[name] = make_spec


def register_coco_instances(name: str, json_file: str | os.PathLike, image_root: str | os.PathLike,
                            dataset_root: str | os.PathLike | None = None) -> None:
    """Register a COCO instances file and the folder its ``file_name`` entries are relative to."""
    spec = DatasetSpec(name, Path(json_file), Path(image_root), Path(dataset_root) if dataset_root else None)
    register_dataset(name, lambda: spec)


def cityscapes_spec(name: str, root: Path, split: str, prepare=None) -> DatasetSpec:
    """Spec of one split of a Cityscapes tree with its converted COCO file."""
    from instsynth.stages.coco_conversion import coco_json_path

    return DatasetSpec(name, coco_json_path(root, split), root / "leftImg8bit" / split, root, split, prepare)


def _prepare_demo() -> None:
    """Write the demo tree and its COCO files if they are missing (idempotent)."""
    from instsynth.stages.coco_conversion import coco_json_path, convert_cityscapes_to_coco
    from instsynth.stages.demo_dataset import write_demo_dataset

    root = demo_root()
    if all(coco_json_path(root, s).is_file() for s in ("train", "val")):
        return
    log.info("building the demo dataset and its COCO files in %s (first use)", root)
    write_demo_dataset(root, size=DEMO_SIZE)
    convert_cityscapes_to_coco(root, splits=("train", "val"), workers=1)


def _register_builtin() -> None:
    for split in ("train", "val", "test"):
        register_dataset(f"cityscapes_fine_instance_seg_{split}",
                         lambda s=split, n=f"cityscapes_fine_instance_seg_{split}":
                         cityscapes_spec(n, tree_root("cityscapes"), s))
    for split in ("train", "val"):
        register_dataset(f"cityscapes_instsynth_{split}",
                         lambda s=split, n=f"cityscapes_instsynth_{split}":
                         cityscapes_spec(n, tree_root("cityscapes_instsynth"), s))
        register_dataset(f"cityscapes_demo_instance_seg_{split}",
                         lambda s=split, n=f"cityscapes_demo_instance_seg_{split}":
                         cityscapes_spec(n, demo_root(), s, _prepare_demo))


_register_builtin()


CATALOG_ENV = "INSTSYNTH_CATALOG"


def load_catalog(path: str | os.PathLike) -> dict[str, DatasetSpec]:
    """Datasets of a YAML catalog ``{NAME: {json_file, image_root}}`` (paths relative to the file)."""
    path = Path(path)
    data = read_yaml(path, f"dataset catalog not found (named by ${CATALOG_ENV})")
    if not isinstance(data, dict):
        raise InstSynthError(path, "expected a mapping NAME: {json_file: PATH, image_root: DIR}")
    specs = {}
    for name, entry in data.items():
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("json_file", "image_root"))):
            raise InstSynthError(path, f"dataset {name!r}: needs string fields json_file and image_root")
        json_file, image_root = (path.parent / Path(entry[k]).expanduser() for k in ("json_file", "image_root"))
        specs[str(name)] = DatasetSpec(str(name), json_file, image_root)
    return specs


def catalog_specs() -> dict[str, DatasetSpec]:
    """Every dataset of the catalog files named by ``$INSTSYNTH_CATALOG`` (read on every call)."""
    specs: dict[str, DatasetSpec] = {}
    for part in filter(None, os.environ.get(CATALOG_ENV, "").split(os.pathsep)):
        specs.update(load_catalog(part))
    return specs


def registered_names() -> list[str]:
    return sorted({*_REGISTRY, *catalog_specs()})


def get_spec(name: str) -> DatasetSpec:
    """The spec of a registered or catalogued dataset; an unknown name lists the registered ones."""
    catalog = catalog_specs()
    if name not in _REGISTRY and name not in catalog:
        close = difflib.get_close_matches(name, registered_names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InstSynthError("DATASETS", f"unknown dataset name {name!r}.{hint} Registered datasets: "
                                         f"{', '.join(registered_names())} (add your own to a YAML catalog named by "
                                         f"${CATALOG_ENV}, or with instsynth.data.catalog.register_coco_instances)")
    spec = _REGISTRY[name]() if name in _REGISTRY else catalog[name]
    if spec.prepare is not None:
        spec.prepare()
    if not spec.json_file.is_file() and spec.dataset_root is None:
        raise InstSynthError(spec.json_file, f"COCO annotations of dataset {name!r} not found")
    if not spec.json_file.is_file():
        raise InstSynthError(spec.json_file, f"COCO annotations of dataset {name!r} not found; convert the "
                             f"Cityscapes tree first: python cityscapes-to-coco-conversion/main_defined_clean_ver.py "
                             f"--dataset cityscapes --datadir {spec.dataset_root or spec.image_root} "
                             "(set INSTSYNTH_DATASETS to the folder holding cityscapes/ and cityscapes_instsynth/)")
    return spec


def get_dataset_dicts(name: str) -> list[dict]:
    """Detectron2-style dicts of a registered dataset (see :func:`instsynth.data.coco.load_coco_json`)."""
    from instsynth.data.coco import load_coco_json

    spec = get_spec(name)
    return load_coco_json(spec.json_file, spec.image_root)


@dataclass(frozen=True)
class Metadata:
    """Class names and the contiguous index <-> COCO category id (= Cityscapes label id) mapping."""
    name: str
    json_file: Path
    image_root: Path
    dataset_root: Path | None
    thing_classes: tuple[str, ...]
    category_ids: tuple[int, ...]  # contiguous index -> category id, sorted by id

    @property
    def contiguous_to_label_id(self) -> dict[int, int]:
        return dict(enumerate(self.category_ids))

    @property
    def label_id_to_contiguous(self) -> dict[int, int]:
        return {cid: i for i, cid in enumerate(self.category_ids)}


@lru_cache(maxsize=None)
def _categories(json_file: Path, mtime: float) -> tuple[tuple[int, str], ...]:
    from instsynth.data.coco import load_coco_categories

    return tuple((int(c["id"]), str(c["name"])) for c in load_coco_categories(json_file))


def get_metadata(name: str) -> Metadata:
    """Metadata of a registered dataset, from its COCO categories sorted by id."""
    spec = get_spec(name)
    cats = _categories(spec.json_file, spec.json_file.stat().st_mtime)
    return Metadata(name, spec.json_file, spec.image_root, spec.dataset_root,
                    tuple(n for _, n in cats), tuple(i for i, _ in cats))


def add_to_catalog(catalog: str | os.PathLike, name: str, json_file: str | os.PathLike,
                   image_root: str | os.PathLike) -> Path:
    """Add (or replace) dataset ``name`` in a YAML catalog file, keeping its other entries; absolute paths."""
    import yaml

    from instsynth.core.io import write_bytes

    catalog = Path(catalog)
    entries = {}
    if catalog.is_file():
        load_catalog(catalog)  # a broken catalog is an error, not something to overwrite
        entries = read_yaml(catalog)
    entries[name] = {"json_file": str(Path(json_file).resolve()), "image_root": str(Path(image_root).resolve())}
    return write_bytes(catalog, yaml.safe_dump(entries, sort_keys=True).encode())
