"""Shared fixtures: a small demo Cityscapes tree built once per test session (offline, seeded)."""
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("INSTSYNTH_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread for torch here and in subprocesses: tiny models gain nothing from more, and on a
# busy 2-core machine two spinning threads ran the training tests up to 10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
DEMO_KW = dict(cities=2, images_per_city=3, size=(512, 256), seed=0)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A read-only-by-convention 512x256 demo tree (2 cities x 3 images per split). Copy before modifying."""
    from instsynth.stages.demo_dataset import write_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "cityscapes"
    write_demo_dataset(root, **DEMO_KW)
    return root


@pytest.fixture
def demo_copy(demo_root, tmp_path) -> Path:
    """A private copy of the demo tree that a test may modify."""
    dst = tmp_path / "cityscapes"
    shutil.copytree(demo_root, dst)
    return dst


@pytest.fixture(scope="module")
def coco_files(demo_root, tmp_path_factory) -> dict:
    """The demo tree exported as COCO files (instsynth.demo.export_coco), per test module. The export runs
    stage 5 inside the tree it reads, so it reads a copy: the session's demo tree stays untouched."""
    from instsynth.stages.demo_dataset import export_coco

    tree = tmp_path_factory.mktemp("coco_source") / "cityscapes"
    shutil.copytree(demo_root, tree)
    return export_coco(tree, tmp_path_factory.mktemp("coco"), workers=1)


@pytest.fixture(scope="module")
def folder_root(demo_root, tmp_path_factory) -> Path:
    """The demo train split as a folder dataset: encoded values (category * 1000 + k), group regions dropped."""
    import numpy as np

    from instsynth.core.io import iter_cityscapes_images, read_png, write_json, write_png
    from instsynth.core.labels import THING_CLASSES, THING_LABEL_IDS

    root = tmp_path_factory.mktemp("folder")
    for im in iter_cityscapes_images(demo_root, "train"):
        (root / "images" / im.city).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(im.left, root / "images" / im.city / f"{im.image_id}.png")
        ids = read_png(im.gt("instanceIds"))
        write_png(root / "instances" / im.city / f"{im.image_id}.png", np.where(ids >= 1000, ids, 0).astype(np.uint16))
    write_json(root / "categories.json", {str(i): n for i, n in zip(THING_LABEL_IDS, THING_CLASSES)})
    return root
