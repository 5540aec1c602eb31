"""Benchmark stage 1 (instance selection) against the paper's loop and against a decode-only floor.

On the same 2048x1024 demo images, in one run, it times:
  reference  the paper's procedure: one process, PIL, np.unique over the full image, a full-size
             single-instance PNG written per selected instance, then the crops cut from those files;
  stage 1    instsynth.stages.selection.select_instances with --workers (default: all cores), fresh output;
  floor      decoding each image's two input PNGs with the same worker processes, nothing else;
and prints reference/stage-1 (target >= 5) and stage-1/floor (target <= 1.3): the best of --repeats
rounds, each round running every pass once. Stage 1 runs with --min-area 0, as the paper selects.
"""
import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def paper_reference(root: Path, out: Path, k: int = 3) -> int:
    """The paper's stage 1, re-stated: returns the number of instances it cropped."""
    import numpy as np
    from PIL import Image

    records = []
    gt_dir = root / "gtFine" / "train"
    for city in sorted(p.name for p in gt_dir.iterdir() if not p.name.endswith(("_inpainted", "_syn"))):
        separated_dir = out / "gtFine" / "train" / f"{city}_syn"
        separated_dir.mkdir(parents=True, exist_ok=True)
        (out / "leftImg8bit" / "train" / f"{city}_syn").mkdir(parents=True, exist_ok=True)
        for ids_file in sorted((gt_dir / city).glob("*_gtFine_instanceIds.png")):
            ids = np.array(Image.open(ids_file))
            values, counts = np.unique(ids, return_counts=True)
            ranked = sorted(zip(values.tolist(), counts.tolist()), key=lambda vc: vc[1], reverse=True)
            for value, _ in [vc for vc in ranked if vc[0] >= 24000][:k]:
                single = ids.copy()
                single[single != value] = 0
                name = ids_file.name.replace("_gtFine_instanceIds.png", f"_{value}_anot.png")
                Image.fromarray(single).save(separated_dir / name)
                records.append((separated_dir / name, root / "leftImg8bit" / "train" / city /
                                ids_file.name.replace("gtFine_instanceIds", "leftImg8bit")))
    boxes = []
    for separated, _ in records:  # pass 2: crop the masks from the full-size files
        array = np.array(Image.open(separated))
        array[array != 0] = 255
        binary = Image.fromarray(array.astype(np.uint8))
        x0, y0, x1, y1 = binary.getbbox()
        w, h = x1 - x0, y1 - y0
        if w >= h:
            y0 = max(0, y0 - (w - h) // 2)
            y1 = y0 + w
        else:
            x0 = max(0, x0 - (h - w) // 2)
            x1 = x0 + h
        binary.crop((x0, y0, x1, y1)).save(str(separated).replace("_anot.png", "_mask.png"))
        boxes.append((x0, y0, x1, y1))
    for (separated, left), box in zip(records, boxes):  # pass 3: crop the RGB images
        rgb_out = str(separated).replace("_anot.png", "_rgb.png").replace("gtFine", "leftImg8bit")
        Image.open(left).crop(box).save(rgb_out)
    (out / "cropped_region_coordinates.json").write_text(json.dumps([list(b) for b in boxes]))
    return len(records)


def _decode_pair(image) -> int:
    """Decode only: both PNGs to arrays in the decoder's native channel order (no colour conversion)."""
    import numpy as np

    from instsynth.core.io import read_png

    ids = read_png(image.gt("instanceIds"), dtype=np.uint16)
    return int(ids.size + read_png(image.left, rgb=True, bgr=True).size)


def decode_floor(root: Path, workers: int) -> int:
    """Decode every train image's instanceIds and leftImg8bit PNG with the stage's worker pool."""
    from instsynth.core.io import iter_cityscapes_images
    from instsynth.core.parallel import ordered_map

    return sum(ordered_map(_decode_pair, iter_cityscapes_images(root, "train"), workers))


def best_times(passes: dict, repeats: int) -> dict:
    """Best wall time of each pass; rounds interleave the passes so that load from other processes
    on a shared machine affects them alike."""
    best = dict.fromkeys(passes, float("inf"))
    for _ in range(repeats):
        for name, fn in passes.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cities", type=int, default=2, help="demo cities per split (default 2)")
    parser.add_argument("--images-per-city", type=int, default=4, help="demo images per city (default 4)")
    parser.add_argument("--workers", type=int, default=None, help="stage-1 and floor workers (default: all cores)")
    parser.add_argument("--k", type=int, default=3, help="instances per image (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each pass; the best counts (default 3)")
    parser.add_argument("--data", default=None, help="demo dataset folder to create or reuse (default: a temp dir)")
    args = parser.parse_args()

    import os
    os.environ.setdefault("INSTSYNTH_NO_PROGRESS", "1")
    os.environ.setdefault("INSTSYNTH_LOG_LEVEL", "WARNING")
    from instsynth.stages.demo_dataset import write_demo_dataset
    from instsynth.core.io import default_workers
    from instsynth.stages.selection import select_instances

    workers = args.workers or default_workers()
    tmp = Path(tempfile.mkdtemp(prefix="bench_selection_"))
    try:
        root = Path(args.data) if args.data else tmp / "cityscapes"
        images = write_demo_dataset(root, cities=args.cities, images_per_city=args.images_per_city,
                                    size=(2048, 1024))
        n_train = sum(i.split == "train" for i in images)

        def fresh(name):
            shutil.rmtree(tmp / name, ignore_errors=True)
            return tmp / name

        # warm the page cache and start the worker server as the CLI does (preloading the stage module)
        select_instances(root, k=args.k, out=fresh("warm"), workers=workers, min_area=0)
        decode_floor(root, workers)
        t = best_times({
            "ref": lambda: paper_reference(root, fresh("ref"), args.k),
            "one": lambda: select_instances(root, k=args.k, out=fresh("one"), workers=1, min_area=0),
            "ours": lambda: select_instances(root, k=args.k, out=fresh("ours"), workers=workers, min_area=0),
            "floor": lambda: decode_floor(root, workers),
        }, args.repeats)
        t_ref, t_one, t_ours, t_floor = t["ref"], t["one"], t["ours"], t["floor"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{n_train} train images 2048x1024, k={args.k}, workers={workers}, best of {args.repeats}")
    print(f"  reference (paper loop, 1 process) {t_ref:7.2f} s")
    print(f"  stage 1, 1 worker                 {t_one:7.2f} s")
    print(f"  stage 1, {workers} workers                {t_ours:7.2f} s")
    print(f"  decode floor, {workers} workers           {t_floor:7.2f} s")
    print(f"reference / stage 1        = {t_ref / t_ours:5.2f}x  (target >= 5)")
    print(f"reference / stage 1 (1 w.) = {t_ref / t_one:5.2f}x")
    print(f"stage 1 / decode floor     = {t_ours / t_floor:5.2f}x  (target <= 1.3)")


if __name__ == "__main__":
    main()
