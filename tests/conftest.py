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
    from instsynth.demo import write_demo_dataset

    root = tmp_path_factory.mktemp("demo") / "cityscapes"
    write_demo_dataset(root, **DEMO_KW)
    return root


@pytest.fixture
def demo_copy(demo_root, tmp_path) -> Path:
    """A private copy of the demo tree that a test may modify."""
    dst = tmp_path / "cityscapes"
    shutil.copytree(demo_root, dst)
    return dst
