"""Benchmark stages 2 and 4 (integration and label crops) on 2048x1024 demo images.

Prints ratios against a single-process reference loop measured in the same run: the paper's
approach (per sample: read the source image and labels, paste through the mask, draw crops with
np.unique over the whole resized crop to check fragments, resize, re-read and crop every label map
per new image; PNGs written with the same encoder, instsynth.io.write_png, since PNG encoding of
2048x1024 images dominates either way). Then instsynth.stages.integration + label_crops in one process
and with --workers, and the cost of a rerun (nothing to do).

    python benchmarks/bench_integration.py [--images-per-city 3] [--samples 2] [--crops 2] [--workers N]
"""
import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path


def reference_loop(gen_dir: Path, out: Path, crops: int, seed: int = 1) -> int:
    """Straightforward single-process stage 2 + 4 (paper-style); returns the number of images written."""
    import cv2
    import numpy as np

    from instsynth.generation import load_manifest
    from instsynth.core.io import CityscapesImage, read_png, write_png
    from instsynth.stages.selection import load_metadata

    manifest = load_manifest(gen_dir)
    meta = load_metadata(manifest["metadata"])
    root, n = Path(meta["dataset_root"]), 0
    for inst in meta["instances"]:
        image = CityscapesImage(root, meta["split"], inst["city"], inst["image_id"])
        for s, sample_path in enumerate(manifest["instances"][inst["key"]]["sample_paths"]):
            rgb = read_png(image.left, rgb=True)
            ids = read_png(image.gt("instanceIds"))
            x0, y0, x1, y1 = inst["crop_box"]
            sample = cv2.resize(read_png(sample_path, rgb=True), (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
            mask = ids[y0:y1, x0:x1] == inst["instance_id"]
            rgb[y0:y1, x0:x1][mask] = sample[mask]
            height, width = ids.shape
            rng = np.random.default_rng([seed, s])
            boxes = [(0, 0, width, height)]
            bx0, by0, bx1, by1 = inst["bbox"]
            for _ in range(crops):
                for _try in range(100):
                    h2 = max(by1 - by0, (bx1 - bx0) / 2)
                    r = max(1, math.ceil(rng.normal(3, 1)))
                    h = math.ceil(math.sqrt(r * 2 * h2 * h2 / 2))
                    if 2 * h > width or h > height:
                        continue
                    cx = int(rng.integers(max(0, bx1 - 2 * h), min(bx0, width - 2 * h) + 1))
                    cy = int(rng.integers(max(0, by1 - h), min(by0, height - h) + 1))
                    lab = cv2.resize(ids[cy:cy + h, cx:cx + 2 * h], (width, height), interpolation=cv2.INTER_NEAREST)
                    values, counts = np.unique(lab, return_counts=True)
                    if (counts[values >= 1000] >= 4).all():
                        boxes.append((cx, cy, cx + 2 * h, cy + h))
                        break
            for c, (cx0, cy0, cx1, cy1) in enumerate(boxes):
                name = f"{inst['key']}_{s}_{c}"
                size = (width, height)
                write_png(out / f"{name}_leftImg8bit.png", cv2.resize(rgb[cy0:cy1, cx0:cx1], size))
                for kind in ("instanceIds", "labelIds", "color"):
                    src = read_png(image.gt(kind))
                    write_png(out / f"{name}_{kind}.png",
                              cv2.resize(src[cy0:cy1, cx0:cx1], size, interpolation=cv2.INTER_NEAREST))
                n += 1
    return n


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--images-per-city", type=int, default=3, help="demo images per city (2 train cities)")
    parser.add_argument("--size", default="2048x1024", help="demo image size WIDTHxHEIGHT")
    parser.add_argument("--samples", type=int, default=2, help="recolor samples per instance")
    parser.add_argument("--crops", type=int, default=2, help="context crops per sample")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    args = parser.parse_args(argv)
    os.environ.setdefault("INSTSYNTH_NO_PROGRESS", "1")
    from instsynth.stages.demo_dataset import write_demo_dataset
    from instsynth.generation import GenerationSettings, generate_instances
    from instsynth.stages.integration import IntegrationParams, integrate_samples
    from instsynth.core.io import default_workers, get_logger
    from instsynth.stages.label_crops import drop_color_and_label_ids
    from instsynth.stages.selection import select_instances

    get_logger().setLevel("WARNING")
    workers = args.workers or default_workers()
    width, height = map(int, args.size.lower().split("x"))
    params = IntegrationParams(crops_per_sample=args.crops)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_demo_dataset(tmp / "cs", cities=2, images_per_city=args.images_per_city, size=(width, height))
        select_instances(tmp / "cs", out=tmp / "s1", workers=workers)
        generate_instances(tmp / "s1" / "metadata.json", settings=GenerationSettings(num_samples=args.samples))
        gen_dir = tmp / "s1" / "Recolor"

        def stages(out: Path, n_workers: int):
            integrate_samples(gen_dir, out, params=params, workers=n_workers)
            drop_color_and_label_ids(out / "cropped_region_coordinates.json", workers=n_workers)

        (tmp / "ref").mkdir()
        images = []
        t_ref = timed(lambda: images.append(reference_loop(gen_dir, tmp / "ref", args.crops)))
        t_one = timed(lambda: stages(tmp / "one", 1))
        t_many = timed(lambda: stages(tmp / "many", workers))
        t_rerun = timed(lambda: stages(tmp / "many", workers))
        shutil.rmtree(tmp / "ref")
    n = images[0]
    print(f"{n} new images ({width}x{height}, {args.samples} samples x (1 panorama + {args.crops} crops))")
    print(f"reference loop (1 process)      {t_ref:7.2f} s  {n / t_ref:6.2f} images/s  1.00x")
    print(f"instsynth, 1 worker             {t_one:7.2f} s  {n / t_one:6.2f} images/s  {t_ref / t_one:.2f}x")
    print(f"instsynth, {workers} workers{'':<{14 - len(str(workers))}}{t_many:7.2f} s  {n / t_many:6.2f} images/s  "
          f"{t_ref / t_many:.2f}x")
    print(f"rerun, nothing to do            {t_rerun:7.2f} s  ({t_rerun / t_many:.1%} of the first run)")


if __name__ == "__main__":
    main()
