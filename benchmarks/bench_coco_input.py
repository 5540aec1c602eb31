"""Benchmark stage 1 on a COCO file against stage 1 on the Cityscapes tree it was exported from.

Builds the demo dataset (2048x1024) in COCO format (``python -m instsynth.demo --format coco``) and
times, in one run, ``select_instances`` on its Cityscapes tree (the baseline) and
``select_coco_instances`` on its COCO export: same instances, same crops. Prints both times (best of
--repeats, fresh output each time) and COCO/Cityscapes (target <= 1.2).
"""
import argparse
import shutil
import tempfile
import time
from pathlib import Path


def best_time(run, out: Path, repeats: int) -> tuple[float, int]:
    """(best seconds, instances) of ``run(out)`` over ``repeats`` rounds, each into a fresh folder."""
    best, count = float("inf"), 0
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        count = run(out).instances
        best = min(best, time.perf_counter() - start)
    return best, count


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images-per-city", type=int, default=4, help="demo images per city (2 cities; default 4)")
    p.add_argument("--workers", type=int, default=1, help="stage-1 worker processes (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="rounds; the best is reported (default 3)")
    args = p.parse_args(argv)

    import os

    os.environ.setdefault("INSTSYNTH_NO_PROGRESS", "1")
    os.environ.setdefault("INSTSYNTH_LOG_LEVEL", "WARNING")
    from instsynth.stages.selection import select_coco_instances
    from instsynth.stages.demo_dataset import write_demo_coco_dataset
    from instsynth.stages.selection import select_instances

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jsons = write_demo_coco_dataset(tmp / "demo", images_per_city=args.images_per_city)
        cs, n_cs = best_time(lambda o: select_instances(tmp / "demo" / "cityscapes", out=o, workers=args.workers),
                             tmp / "cs", args.repeats)
        coco, n_coco = best_time(lambda o: select_coco_instances(jsons["train"], tmp / "demo" / "images" / "train",
                                                                 out=o, workers=args.workers), tmp / "coco", args.repeats)
    print(f"Cityscapes path: {cs:.3f} s ({n_cs} instances)\nCOCO path:       {coco:.3f} s ({n_coco} instances)\n"
          f"COCO / Cityscapes: {coco / cs:.2f}")


if __name__ == "__main__":
    main()
