"""benchmarks/bench_coco_scale.py: its LVIS-like files are valid COCO, and --quick prints every ratio."""
import math
import re
import runpy
import subprocess
import sys
from collections import Counter

from conftest import REPO

BENCH = REPO / "benchmarks" / "bench_coco_scale.py"


def test_lvis_like_file_is_long_tailed_valid_coco(tmp_path):
    from instsynth.formats.coco import load_coco_source

    bench = runpy.run_path(str(BENCH))
    pool = bench["image_pool"](tmp_path / "pool", 64, 48, 3)
    path = bench["write_dataset"](tmp_path / "d", 400, 64, 48, 5, pool)
    source = load_coco_source(path, tmp_path / "d" / "images")
    assert source.bad == [] and len(source.categories) == 1200
    anns = source.data["annotations"]
    kinds = Counter("crowd" if a["iscrowd"] else type(a["segmentation"]).__name__ for a in anns)
    assert kinds["list"] > 300 and kinds["dict"] + kinds["crowd"] > 0
    per_category = Counter(a["category_id"] for a in anns)
    assert per_category[1200] == 5  # bench_target: the fixed sample count
    assert per_category.most_common(1)[0][1] > 10 * max(1, per_category[100])  # Zipf: the head dwarfs the middle
    assert all(20 <= len(a["segmentation"][0]) // 2 <= 60 for a in anns if isinstance(a["segmentation"], list))


def test_quick_run_prints_the_ratios(tmp_path):
    run = subprocess.run([sys.executable, str(BENCH), "--quick", "--data", str(tmp_path)], capture_output=True,
                         text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    for label in ("stage 1 / floor", "2 workers / 1", "integration peak / JSON", "integration of 8 samples"):
        assert label in out, out
    ratios = [float(v) for v in re.findall(r"= ([0-9.]+)x", out)]
    assert len(ratios) == 7 and all(math.isfinite(r) and r > 0 for r in ratios), out
