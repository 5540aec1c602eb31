"""The golden demo runs: every file of `make demo` (Cityscapes) and of the demo COCO run, as sha256.

``tests/golden/demo_hashes.json`` was recorded before the one-pipeline redesign (issue 17);
``tests/test_golden.py`` reruns both pipelines and requires the same bytes. A file's hash is taken
after two normalisations only: the run's temporary root is replaced by ``$ROOT`` and the checkout by
``$REPO`` (absolute paths in JSON and YAML files), the value of every ``"seconds"`` field (wall time) by 0, and every 64-digit hex
string by ``<sha256>``: fingerprints hash absolute paths (the files they stand for are hashed here).

Record anew (only for a deliberate change of output, which the test must then name):

    .venv/bin/python tests/golden_runs.py --record
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HASHES = Path(__file__).resolve().parent / "golden" / "demo_hashes.json"
TIMING = re.compile(rb'"seconds": [0-9.eE+-]+')
SHA256 = re.compile(rb'"[0-9a-f]{64}"')
TEXT_SUFFIXES = (".json", ".yaml", ".yml", ".txt")


def _env() -> dict:
    return {**os.environ, "PYTHON": sys.executable, "INSTSYNTH_NO_PROGRESS": "1", "PYTHONPATH": str(REPO),
            "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], env: dict | None = None) -> None:
    done = subprocess.run(cmd, cwd=REPO, env={**_env(), **(env or {})}, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def run_cityscapes_demo(root: Path) -> Path:
    """`make demo` into ``root/cityscapes_demo``: demo tree, the full wrapper (recolor, 2 samples), pictures."""
    out = root / "cityscapes_demo"
    _run(["bash", "scripts/demo.sh"], {"DEMO_DIR": str(out / "demo_output"), "VIS_DIR": str(out / "visualization")})
    return out


def run_coco_demo(root: Path) -> Path:
    """`python -m instsynth.demo OUT --format coco` and `run_instsynth.sh --coco` into ``root/coco_demo``."""
    out = root / "coco_demo"
    data = out / "demo_coco"
    _run([sys.executable, "-m", "instsynth.demo", str(data), "--format", "coco"])
    _run(["bash", "scripts/run_instsynth.sh", "--coco", str(data / "annotations/instances_train.json"),
          "--images", str(data / "images/train"), "--val-coco", str(data / "annotations/instances_val.json"),
          "--val-images", str(data / "images/val")],
         {"OUTPUT_DATASET_PATH": str(out / "instsynth"), "WORK_DIR": str(out / "work")})
    return out


def normalised_bytes(path: Path, root: Path) -> bytes:
    """The file's bytes, normalised in text files (see the module docstring)."""
    data = path.read_bytes()
    if path.suffix in TEXT_SUFFIXES:
        data = data.replace(str(root).encode(), b"$ROOT").replace(str(REPO).encode(), b"$REPO")
        data = SHA256.sub(b'"<sha256>"', TIMING.sub(b'"seconds": 0', data))
    return data


def tree_hashes(top: Path, root: Path) -> dict[str, str]:
    """sha256 of every file under ``top`` (normalised), by path relative to ``top``."""
    return {p.relative_to(top).as_posix(): hashlib.sha256(normalised_bytes(p, root)).hexdigest()
            for p in sorted(top.rglob("*")) if p.is_file()}


def golden_hashes(root: Path) -> dict[str, dict[str, str]]:
    """Both demo runs under ``root``; their file hashes by run."""
    root = root.resolve()
    return {"cityscapes": tree_hashes(run_cityscapes_demo(root), root), "coco": tree_hashes(run_coco_demo(root), root)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help=f"write {HASHES.relative_to(REPO)}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hashes = golden_hashes(Path(tmp))
    counts = {run: len(files) for run, files in hashes.items()}
    if args.record:
        HASHES.parent.mkdir(exist_ok=True)
        HASHES.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
        print(f"recorded {counts} -> {HASHES}")
    else:
        print(json.dumps(counts))


if __name__ == "__main__":
    main()
