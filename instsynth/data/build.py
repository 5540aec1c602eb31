"""Data loaders: an infinite, seeded, resumable training stream and a sharded test loader.

Training samples are addressed by their *position* in one global stream (iteration x batch + slot):
position p reads image ``perm_e[p % n]`` of the epoch-e permutation (``e = p // n``, seeded by
(SEED, e)) and draws its augmentation from a generator seeded by (SEED, p). A run therefore sees the
same images with the same augmentations whatever the worker count, and ``--resume`` continues the
stream at the saved iteration.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from instsynth.data.catalog import get_dataset_dicts, get_metadata
from instsynth.data.mapper import DatasetMapper
from instsynth.core.io import InstSynthError, get_logger

log = get_logger("instsynth.data")


def train_dataset_dicts(cfg) -> list[dict]:
    """The dicts of every DATASETS.TRAIN name (concatenated); images without targets dropped if asked."""
    dicts = [d for name in cfg.DATASETS.TRAIN for d in get_dataset_dicts(name)]
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        before = len(dicts)
        dicts = [d for d in dicts if any(not a.get("iscrowd", 0) for a in d["annotations"])]
        log.info("training on %d images (%d without instances left out)", len(dicts), before - len(dicts))
    if not dicts:
        raise InstSynthError("DATASETS.TRAIN", f"no training images with instances in {list(cfg.DATASETS.TRAIN)}")
    return dicts


def check_same_categories(names) -> None:
    """All datasets of a run must share one category list (the contiguous index depends on it)."""
    cats = {name: get_metadata(name).category_ids for name in names}
    if len(set(cats.values())) > 1:
        raise InstSynthError("DATASETS", f"datasets have different categories: {cats}")


class StreamDataset(Dataset):
    """Map-style view of the infinite training stream: item ``p`` is the sample at position p."""

    def __init__(self, dicts: list[dict], mapper: DatasetMapper, seed: int):
        self.dicts, self.mapper, self.seed = dicts, mapper, seed

    def __len__(self) -> int:  # positions are unbounded; DataLoader only needs a value
        return len(self.dicts)

    @lru_cache(maxsize=4)
    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dicts))

    def __getitem__(self, position: int) -> dict:
        n = len(self.dicts)
        record = self.dicts[int(self.permutation(position // n)[position % n])]
        return self.mapper(record, np.random.default_rng([self.seed, 1, position]))


class StreamBatchSampler(Sampler):
    """Batches of stream positions of one process, from ``start_iter`` on, forever."""

    def __init__(self, ims_per_batch: int, rank: int, world_size: int, start_iter: int = 0):
        if ims_per_batch % world_size:
            raise InstSynthError("SOLVER.IMS_PER_BATCH", f"{ims_per_batch} is not divisible by the "
                                                         f"number of processes ({world_size})")
        self.total, self.per_rank = ims_per_batch, ims_per_batch // world_size
        self.rank, self.start_iter = rank, start_iter

    def __iter__(self):
        it = self.start_iter
        while True:
            first = it * self.total + self.rank * self.per_rank
            yield list(range(first, first + self.per_rank))
            it += 1


def trivial_collate(batch: list) -> list:
    return batch


def build_train_loader(cfg, rank: int = 0, world_size: int = 1, start_iter: int = 0) -> DataLoader:
    """Infinite loader of lists of mapped training samples (IMS_PER_BATCH / world_size per process)."""
    check_same_categories(cfg.DATASETS.TRAIN)
    meta = get_metadata(cfg.DATASETS.TRAIN[0])
    mapper = DatasetMapper(cfg, True, meta.label_id_to_contiguous)
    dataset = StreamDataset(train_dataset_dicts(cfg), mapper, cfg.SEED)
    sampler = StreamBatchSampler(cfg.SOLVER.IMS_PER_BATCH, rank, world_size, start_iter)
    workers = cfg.DATALOADER.NUM_WORKERS
    # an own generator: creating the iterator must not consume the global RNG (exact --resume)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=trivial_collate, num_workers=workers,
                      prefetch_factor=2 if workers else None, generator=torch.Generator().manual_seed(cfg.SEED))


class _TestDataset(Dataset):
    def __init__(self, dicts: list[dict], mapper: DatasetMapper):
        self.dicts, self.mapper = dicts, mapper

    def __len__(self) -> int:
        return len(self.dicts)

    def __getitem__(self, i: int) -> dict:
        return self.mapper(self.dicts[i])


def build_test_loader(cfg, dataset_name: str, rank: int = 0, world_size: int = 1) -> tuple[DataLoader, list[dict]]:
    """Loader over this process's share of a test dataset (one image per batch) and all its dicts."""
    meta = get_metadata(dataset_name)
    dicts = get_dataset_dicts(dataset_name)
    mapper = DatasetMapper(cfg, False, meta.label_id_to_contiguous)
    shard = dicts[rank::world_size]
    loader = DataLoader(_TestDataset(shard, mapper), batch_size=1, shuffle=False, collate_fn=trivial_collate,
                        num_workers=min(cfg.DATALOADER.NUM_WORKERS, len(shard)))
    return loader, dicts
