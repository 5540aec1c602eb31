"""Benchmark stage 5 (Cityscapes -> COCO) on 2048x1024 demo images.

Prints images/s, CPU time per image and ratios against a single-process reference loop measured in the same run: the
straightforward converter (np.unique over the full image, one full-size mask per instance, contours
and RLE on full-size masks). Then instsynth.coco in one process (bbox-local work) and with --workers.

    python benchmarks/bench_coco.py [--images-per-city 5] [--size 2048x1024] [--workers N] [--repeats 2]
"""
import argparse
import os
import resource
import tempfile
import time
from pathlib import Path


def reference_loop(root: Path, split: str) -> int:
    """Full-image, single-process conversion of one split; returns the number of annotations."""
    import cv2
    import numpy as np
    from pycocotools import mask as mask_utils

    from instsynth.core.io import iter_cityscapes_images, read_png

    n = 0
    for image in iter_cityscapes_images(root, split, include_generated=True):
        inst = read_png(image.gt("instanceIds"))
        for value in np.unique(inst):
            if value < 24:
                continue
            mask = (inst == value).astype(np.uint8)
            contours, _ = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
            rle = mask_utils.encode(np.asfortranarray(mask))
            n += len(contours) > 0 and bool(rle)
    return n


def _cpu_seconds() -> float:
    """CPU time of this process (worker processes are not counted: they are not its children)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def _best_time(fn, repeats: int) -> tuple[float, float]:
    """(best wall seconds, CPU seconds of that run) over ``repeats`` runs."""
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), _cpu_seconds()
        fn()
        best = min(best, (time.perf_counter() - wall, _cpu_seconds() - cpu))
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--images-per-city", type=int, default=5, help="demo images per city (2 cities per split)")
    parser.add_argument("--size", default="2048x1024", help="demo image size WIDTHxHEIGHT")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timings per variant")
    args = parser.parse_args(argv)
    os.environ.setdefault("INSTSYNTH_NO_PROGRESS", "1")
    from instsynth.stages.coco_conversion import convert_cityscapes_to_coco
    from instsynth.stages.demo_dataset import write_demo_dataset
    from instsynth.core.io import default_workers, get_logger

    get_logger().setLevel("WARNING")
    workers = args.workers or default_workers()
    width, height = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cityscapes"
        n_images = len(write_demo_dataset(root, 2, args.images_per_city, (width, height)))
        print(f"{n_images} demo images of {width}x{height}, {workers} workers, best of {args.repeats}")
        convert_cityscapes_to_coco(root, workers=workers, write_polygons=False)  # warm-up: starts the worker server
        timings = {
            "reference loop (full-image masks, 1 process)":
                _best_time(lambda: [reference_loop(root, s) for s in ("train", "val")], args.repeats),
            "instsynth.coco, 1 process":
                _best_time(lambda: convert_cityscapes_to_coco(root, workers=1, write_polygons=False), args.repeats),
            f"instsynth.coco, {workers} workers":
                _best_time(lambda: convert_cityscapes_to_coco(root, workers=workers, write_polygons=False), args.repeats),
        }
        for poly in root.glob("gtFine/*/*/*_polygons.json"):
            poly.unlink()  # every image now needs a polygons.json, as synthetic images do
        timings[f"instsynth.coco, {workers} workers, writing polygons.json"] = _best_time(
            lambda: convert_cityscapes_to_coco(root, workers=workers), 1)
    reference = next(iter(timings.values()))[0]
    print(f"{'':<60s} {'images/s':>9s} {'vs ref':>7s} {'CPU ms/image':>13s}")
    for name, (seconds, cpu) in timings.items():
        cpu_text = f"{1000 * cpu / n_images:13.1f}" if "workers" not in name else f"{'-':>13s}"
        print(f"{name:<60s} {n_images / seconds:9.1f} {reference / seconds:6.2f}x {cpu_text}")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; other processes "
          "slow the wall-clock numbers, CPU ms/image (one process) does not depend on them")

if __name__ == "__main__":
    main()
