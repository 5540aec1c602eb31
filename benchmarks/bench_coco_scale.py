"""Benchmark stage 1 and integration on LVIS-like COCO files of growing size (issue 21).

It writes the files itself: 1,200 long-tail categories (Zipf frequencies, LVIS ``frequency`` r/c/f),
about 8 annotations per image, 20-60 point polygons, some compressed RLE and some crowd RLE, and one
rare category ``bench_target`` with exactly --samples annotations at every size. Images are
--image-size PNGs of --distinct-images contents, written once and hard-linked under every file name.
For each size (default 1k, 20k and 100k annotations) it times, as the median of --repeats rounds
(each round runs every pass once, interleaved):

  floor       pycocotools loading the file plus decoding the images stage 1 crops (--workers processes);
  stage 1     ``select_coco_instances`` (k=3, all categories) with 1 worker and with --workers;
  integration ``inpainted_integration.py`` (a subprocess: its wall time and peak memory) on --samples
              recolor samples of ``bench_target`` (stage 1 and generation through their CLIs, untimed);

and prints stage 1 / floor, the speed-up of --workers over 1 worker, integration at the largest size /
at the smallest, and integration peak memory / JSON size. ``--quick`` runs two small sizes once.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CATEGORIES = 1200
TARGET = "bench_target"
ANNS_PER_IMAGE = 8
RLE_SHARE, CROWD_SHARE = 0.03, 0.02


# --------------------------------------------------------------------------- the synthetic LVIS-like file
def _categories() -> list[dict]:
    cats = []
    for i in range(1, CATEGORIES):
        freq = "f" if i <= 405 else "c" if i <= 866 else "r"
        cats.append({"id": i, "name": f"thing_{i:04d}", "synonyms": [f"thing_{i:04d}"], "def": f"object {i}",
                     "frequency": freq, "image_count": 0, "instance_count": 0})
    cats.append({"id": CATEGORIES, "name": TARGET, "synonyms": [TARGET], "def": "fixed-count target",
                 "frequency": "r", "image_count": 0, "instance_count": 0})
    return cats


def _polygon(rng, width: int, height: int, radius: float):
    import numpy as np

    n = int(rng.integers(20, 61))
    cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = radius * rng.uniform(0.6, 1.0, n)
    xs = np.clip(cx + r * np.cos(angles), 0, width - 1)
    ys = np.clip(cy + r * np.sin(angles), 0, height - 1)
    return np.round(np.stack([xs, ys], 1), 2)


def _rle(points, width: int, height: int, compressed: bool) -> dict:
    import numpy as np
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects([points.ravel().tolist()], height, width)[0]
    if compressed:
        return {"size": [height, width], "counts": rle["counts"].decode()}
    flat = mask_utils.decode(rle).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(edges).tolist()
    return {"size": [height, width], "counts": ([0] + runs) if flat[0] else runs}


def _shoelace(points) -> float:
    import numpy as np

    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _annotation(rng, ann_id: int, image_id: int, category: int, width: int, height: int, kind: str,
                radius: float) -> dict:
    points = _polygon(rng, width, height, radius)
    x0, y0 = points.min(0)
    x1, y1 = points.max(0)
    seg = points.ravel().tolist() if kind == "polygon" else None
    segmentation = [seg] if seg else _rle(points, width, height, compressed=kind == "rle")
    return {"id": ann_id, "image_id": image_id, "category_id": category, "segmentation": segmentation,
            "area": _shoelace(points),
            "bbox": [float(x0), float(y0), float(max(x1 - x0, 1.0)), float(max(y1 - y0, 1.0))],
            "iscrowd": int(kind == "crowd")}


def lvis_like(n_annotations: int, width: int, height: int, samples: int, seed: int = 0) -> dict:
    """An LVIS-like instances dict of ``n_annotations`` (``samples`` of them of ``bench_target``)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_images = max(samples, -(-n_annotations // ANNS_PER_IMAGE))
    weights = 1.0 / np.arange(1, CATEGORIES) ** 1.1
    categories = rng.choice(np.arange(1, CATEGORIES), n_annotations, p=weights / weights.sum())
    owners = np.sort(rng.integers(0, n_images, n_annotations))
    kinds = rng.choice(["polygon", "rle", "crowd"], n_annotations, p=[1 - RLE_SHARE - CROWD_SHARE, RLE_SHARE, CROWD_SHARE])
    images = [{"id": i + 1, "file_name": f"{i:012d}.png", "width": width, "height": height,
               "not_exhaustive_category_ids": [], "neg_category_ids": []} for i in range(n_images)]
    small = 0.25 * min(width, height)
    anns = []
    for n in range(n_annotations):
        target = n < samples  # the first `samples` images hold one large target each
        image = n if target else int(owners[n])
        anns.append(_annotation(rng, n + 1, image + 1, CATEGORIES if target else int(categories[n]), width, height,
                                "polygon" if target else str(kinds[n]),
                                0.4 * min(width, height) if target else rng.uniform(0.3, 1.0) * small))
    return {"info": {"description": "bench_coco_scale LVIS-like file"}, "images": images, "annotations": anns,
            "categories": _categories(), "licenses": []}


def image_pool(folder: Path, width: int, height: int, distinct: int) -> list[Path]:
    """``distinct`` smooth random PNGs of ``width`` x ``height`` (written once)."""
    import cv2
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(distinct):
        path = folder / f"pool_{width}x{height}_{i:03d}.png"
        if not path.exists():
            noise = rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
            image = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
            image = np.clip(image.astype(np.int16) + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(path), image)
        paths.append(path)
    return paths


def write_dataset(folder: Path, n_annotations: int, width: int, height: int, samples: int, pool: list[Path]) -> Path:
    """``folder/annotations.json`` and ``folder/images/`` (hard links into ``pool``); reused when present."""
    json_path = folder / "annotations.json"
    if json_path.exists():
        return json_path
    data = lvis_like(n_annotations, width, height, samples)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for n, img in enumerate(data["images"]):
        target = images / img["file_name"]
        if not target.exists():
            try:
                os.link(pool[n % len(pool)], target)
            except OSError:
                shutil.copyfile(pool[n % len(pool)], target)
    tmp = json_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(json_path)
    return json_path


# --------------------------------------------------------------------------- the passes
def _decode(path: str) -> int:
    from instsynth.core.io import read_png

    return int(read_png(path, rgb=True, bgr=True).size)


def floor_pass(json_path: Path, images: Path, cropped: list[str], workers: int) -> None:
    """pycocotools loading the file, then decoding the images stage 1 crops with its worker pool."""
    from pycocotools.coco import COCO

    from instsynth.core.parallel import ordered_map
    from instsynth.stages.selection import task_chunk

    with contextlib.redirect_stdout(io.StringIO()):
        COCO(str(json_path))
    paths = [str(images / name) for name in cropped]
    sum(ordered_map(_decode, paths, workers, task_chunk(len(paths), workers)))


def stage1_pass(json_path: Path, images: Path, out: Path, workers: int):
    from instsynth.stages.selection import select_coco_instances

    shutil.rmtree(out, ignore_errors=True)
    return select_coco_instances(json_path, images, out=out, workers=workers, k=3)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "INSTSYNTH_NO_PROGRESS": "1", "INSTSYNTH_LOG_LEVEL": "WARNING"}


_PEAK = """import os, resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")]
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    open(os.environ["BENCH_PEAK_FILE"], "w").write(str(max(hwm + [workers])))
"""
"""Runs a CLI script and writes its peak resident kB: its own high-water mark since exec (``VmHWM``) or
its workers'. The rusage of the benchmark's child would also count the benchmark's own pages, which the
forked child holds until it execs (760 MB at 100k annotations, whatever integration uses)."""


def _run(args: list) -> tuple[float, int]:
    """(wall seconds, peak resident bytes) of a CLI subprocess; a failure stops the benchmark with its stderr."""
    with tempfile.NamedTemporaryFile(prefix="bench_peak_", suffix=".txt", delete=False) as peak_file:
        peak_path = Path(peak_file.name)
    linux = Path("/proc/self/status").exists()
    prefix = ["-c", _PEAK] if linux else []
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *prefix, *map(str, args)], cwd=REPO,
                            env={**_env(), "BENCH_PEAK_FILE": str(peak_path)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak = peak_path.read_text().strip() if linux else ""
    peak_path.unlink(missing_ok=True)
    if proc.returncode:
        sys.exit(f"error: {args[0]} failed ({proc.returncode}): {stderr.decode()[-2000:]}")
    return wall, (int(peak) if peak else usage.ru_maxrss) * 1024


def prepare_integration(json_path: Path, images: Path, work: Path, samples: int) -> Path:
    """Stage 1 on ``bench_target`` and one recolor sample each (CLIs, untimed): the generation folder."""
    sel = work / "sel_target"
    if not (sel / "Recolor" / "generation.json").exists():
        _run([REPO / "process_clean_ver.py", "--coco", json_path, "--images", images, "--classes", TARGET,
              "--k", "1", "--out", sel, "--workers", "1"])
        _run([REPO / "generation" / "instance_generation.py", "--mode", "recolor", "--metadata", sel / "metadata.json"])
    instances = len(json.loads((sel / "metadata.json").read_text())["instances"])
    if instances != samples:
        sys.exit(f"error: {sel}: {instances} {TARGET} instances selected, expected {samples}")
    return sel / "Recolor"


def integration_pass(generation: Path, out: Path, workers: int) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    return _run([REPO / "inpainted_integration.py", "--inpainting_dir", generation, "--output_folder_name", out,
                 "--workers", workers])


# --------------------------------------------------------------------------- the run
def measure_size(n: int, args, data: Path, pool: list[Path]) -> dict:
    """Median times of every pass at ``n`` annotations, and the integration's median peak memory."""
    width, height = args.image_size
    folder = data / f"lvis_like_{n}_{width}x{height}_{args.samples}"
    json_path = write_dataset(folder, n, width, height, args.samples, pool)
    images, work = folder / "images", folder / "work"
    summary = stage1_pass(json_path, images, work / "warm", args.workers)  # warms the page cache and the pool
    meta = json.loads(summary.metadata.read_text())
    cropped = sorted({i["image"] for i in meta["instances"]})
    generation = prepare_integration(json_path, images, work, args.samples)
    passes = {
        "floor": lambda: floor_pass(json_path, images, cropped, args.workers),
        "stage1_1": lambda: stage1_pass(json_path, images, work / "s1", 1),
        "stage1_w": lambda: stage1_pass(json_path, images, work / "sw", args.workers),
        "integration": lambda: integration_pass(generation, work / "integrated", args.workers),
    }
    times: dict[str, list[float]] = {name: [] for name in passes}
    peaks: list[int] = []
    for _ in range(args.repeats):
        for name, fn in passes.items():
            start = time.perf_counter()
            result = fn()
            if name == "integration":
                times[name].append(result[0])
                peaks.append(result[1])
            else:
                times[name].append(time.perf_counter() - start)
    shutil.rmtree(work / "s1", ignore_errors=True)
    shutil.rmtree(work / "sw", ignore_errors=True)
    got = {name: statistics.median(v) for name, v in times.items()}
    return {**got, "n": n, "images": len(cropped), "instances": summary.instances,
            "json_mb": json_path.stat().st_size / 1e6, "peak_mb": statistics.median(peaks) / 1e6}


def report(rows: list[dict], args) -> None:
    w = args.workers
    print(f"LVIS-like COCO files, {CATEGORIES} categories, {args.image_size[0]}x{args.image_size[1]} images, "
          f"k=3, {w} workers, median of {args.repeats}")
    print(f"{'annotations':>11} {'JSON MB':>8} {'floor s':>8} {'stage1 1w':>9} {f'stage1 {w}w':>9} "
          f"{'integr. s':>9} {'peak MB':>8}")
    for r in rows:
        print(f"{r['n']:>11} {r['json_mb']:>8.1f} {r['floor']:>8.2f} {r['stage1_1']:>9.2f} {r['stage1_w']:>9.2f} "
              f"{r['integration']:>9.2f} {r['peak_mb']:>8.0f}")
    for r in rows:
        print(f"{r['n']:>7} annotations: stage 1 / floor = {r['stage1_w'] / r['floor']:.2f}x (target <= 1.15), "
              f"{w} workers / 1 = {r['stage1_1'] / r['stage1_w']:.2f}x (target >= 1.6), "
              f"integration peak / JSON = {r['peak_mb'] / r['json_mb']:.2f}x (target < 3)")
    first, last = rows[0], rows[-1]
    print(f"integration of {args.samples} samples at {last['n']} / at {first['n']} annotations = "
          f"{last['integration'] / first['integration']:.2f}x (target <= 1.5)")


def _size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,20000,100000", help="annotations per file (default 1000,20000,100000)")
    p.add_argument("--image-size", type=_size, default=(320, 240), help="WxH of every image (default 320x240)")
    p.add_argument("--distinct-images", type=int, default=64, help="different image contents (default 64)")
    p.add_argument("--samples", type=int, default=40, help="integrated samples at every size (default 40)")
    p.add_argument("--workers", type=int, default=2, help="workers of the parallel passes (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="rounds; medians are reported (default 3)")
    p.add_argument("--data", default=None, help="folder to create or reuse the files in (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="a smoke test: 300 and 1500 annotations, 96x72 images, "
                                                         "8 samples, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.image_size, args.samples, args.repeats, args.distinct_images = "300,1500", (96, 72), 8, 1, 8
    os.environ.setdefault("INSTSYNTH_NO_PROGRESS", "1")
    os.environ.setdefault("INSTSYNTH_LOG_LEVEL", "WARNING")
    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench_coco_scale_"))
    try:
        data = Path(args.data) if args.data else tmp
        pool = image_pool(data / "pool", *args.image_size, args.distinct_images)
        rows = []
        for n in sizes:
            rows.append(measure_size(n, args, data, pool))
            print(f"measured {n} annotations: {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(rows, args)


if __name__ == "__main__":
    main()
