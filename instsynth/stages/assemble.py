"""Stage 3: put the original splits of a Cityscapes tree into the output dataset.

Every file under ``SRC/{leftImg8bit,gtFine}/<split>/<city>/`` (any city names; train, val and test
where they exist) is placed at the same relative path under ``DST``: hard-linked by default (copied
where the filesystem cannot link, e.g. across devices), or copied / symlinked on request. Each file
appears atomically (made under a temporary name, then renamed), so an interrupted run leaves no
partial file, and a rerun skips files that are already identical (same inode or same bytes).
Source files are never opened for writing.
"""
from __future__ import annotations

import errno
import filecmp
import os
import shutil
from pathlib import Path

from instsynth.core.io import (InstSynthError, OutputError, atomic_path, get_logger, is_generated_folder, progress,
                               report_generated_images)

SPLITS = ("train", "val", "test")
TOP_FOLDERS = ("leftImg8bit", "gtFine")
MODES = ("link", "copy", "symlink")
_NO_LINK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EACCES}

log = get_logger("instsynth.assemble")


def source_files(src: str | Path, splits=SPLITS, include_generated: bool = False) -> list[Path]:
    """Files to place, relative to ``src``: every file under ``{leftImg8bit,gtFine}/<split>/<city>/``.

    City folders written by InstSynth (``*_syn``, ``*_inpainted``) are left out unless
    ``include_generated``. Raises InstSynthError when no requested split exists.
    """
    src = Path(src)
    files, found = [], False
    for top in TOP_FOLDERS:
        for split in splits:
            split_dir = src / top / split
            if not split_dir.is_dir():
                continue
            found = True
            for city_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
                if is_generated_folder(city_dir.name) and not include_generated:
                    continue
                files += sorted(p.relative_to(src) for p in city_dir.rglob("*") if p.is_file())
    if not found:
        raise InstSynthError(src, f"no split folder found (expected {'/'.join(TOP_FOLDERS)}/<{'|'.join(splits)}>/)")
    return files


def is_identical(src: Path, dst: Path) -> bool:
    """True when ``dst`` already holds ``src``: the same file (hard or symbolic link) or the same bytes."""
    if not dst.exists():
        return False
    if os.path.samefile(src, dst):
        return True
    return dst.is_file() and dst.stat().st_size == src.stat().st_size and filecmp.cmp(src, dst, shallow=False)


def place_file(src: Path, dst: Path, mode: str = "link") -> str:
    """Make ``dst`` hold ``src`` atomically; return "skipped", "linked", "copied" or "symlinked".

    ``mode="link"`` falls back to copying when a hard link is impossible (other device, no
    permission, unsupported filesystem). An existing different ``dst`` is replaced.
    """
    if is_identical(src, dst):
        return "skipped"
    with atomic_path(dst) as tmp:
        if mode == "copy":
            shutil.copyfile(src, tmp)
            shutil.copystat(src, tmp)
            return "copied"
        tmp.unlink()
        if mode == "symlink":
            os.symlink(src.resolve(), tmp)
            return "symlinked"
        try:
            os.link(src, tmp)
            return "linked"
        except OSError as exc:
            if exc.errno not in _NO_LINK_ERRNOS:
                raise
            shutil.copyfile(src, tmp)
            shutil.copystat(src, tmp)
            return "copied"


def _check_paths(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise InstSynthError(src, "source dataset folder not found")
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r == src_r:
        raise InstSynthError(dst, "destination is the source folder")
    for top in TOP_FOLDERS:
        if dst_r.is_relative_to(src_r / top):
            raise InstSynthError(dst, f"destination lies inside the source's {top}/ folder")


def assemble_dataset(src: str | Path, dst: str | Path, mode: str = "link", splits=SPLITS,
                     include_generated: bool = False) -> dict:
    """Place the original splits of ``src`` under ``dst`` (see module doc); return counts per outcome.

    Returns ``{"mode", "splits": [found splits], "files": n, "linked", "copied", "symlinked", "skipped",
    "synthetic_images": {split: n}}``: the last counts the images stage 2 wrote into ``dst`` (``*_syn``
    cities), logged in one line, with a warning when there are none.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst)
    files = source_files(src, splits, include_generated)
    counts = dict.fromkeys(("linked", "copied", "symlinked", "skipped"), 0)
    for rel in progress(files, f"{mode} {src.name} -> {dst.name}"):
        try:
            counts[place_file(src / rel, dst / rel, mode)] += 1
        except OutputError:
            raise
        except OSError as exc:
            raise InstSynthError(src / rel, f"cannot {mode} to {dst / rel}: {exc.strerror or exc}") from None
    found = [s for s in splits if any((src / top / s).is_dir() for top in TOP_FOLDERS)]
    report = {"mode": mode, "splits": found, "files": len(files), **counts}
    log.info("%s -> %s: %s", src, dst, report)
    report["synthetic_images"] = report_generated_images(log, dst, found, "stage 3")
    return report
