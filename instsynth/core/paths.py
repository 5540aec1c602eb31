"""Confinement of every path that comes from a manifest or a dataset file (issue 19), in one place.

- :func:`plain_name`: a split, a Cityscapes city or an image id is one plain folder name (no ``/``, not ``..``);
- :func:`relative_name`: a COCO city or ``file_name`` may have sub-folders, but no ``..`` and no absolute path;
- :func:`confined`: ``root / rel`` resolved (symlinks too) must stay inside ``root``; :func:`within`
  the same for a path recorded absolute (a source file under ``dataset_root``);
- :func:`entry_folders` / :func:`output_file`: the split and city of a manifest entry, and the output file
  built from them, stay inside the output root;
- :func:`removable` / :func:`remove_stale_files`: a stale output is deleted only if the manifest recorded it,
  it resolves inside the output root and is a file of a kind the stage writes; otherwise nothing is deleted;
- :func:`check_disjoint`: an output folder may not be inside an input, nor contain one.

Errors are :class:`InstSynthError` naming the manifest, the field and the value.
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Iterable

from instsynth.core.io import InstSynthError


def plain_name(manifest: str | os.PathLike, field: str, value: object) -> str:
    """``value`` if it is one plain file or folder name: not empty, ``.`` or ``..``, no ``/``, ``\\`` or NUL."""
    if not isinstance(value, str) or value in ("", ".", "..") or any(c in value for c in "/\\\x00"):
        raise InstSynthError(manifest, f"field {field!r}: {value!r} is not a plain folder name")
    return value


def _relative_parts(manifest, field: str, rel: object) -> PurePosixPath:
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise InstSynthError(manifest, f"field {field!r}: {rel!r} is not a relative path")
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or re.match(r"^[A-Za-z]:", rel):
        raise InstSynthError(manifest, f"field {field!r}: {rel!r} leaves its folder (absolute path or '..')")
    return path


def relative_name(manifest: str | os.PathLike, field: str, value: object) -> str:
    """``value`` if it is a relative path without ``..`` (sub-folders allowed, e.g. a COCO city)."""
    _relative_parts(manifest, field, value)
    return value  # type: ignore[return-value]


def confined(root: str | os.PathLike, rel: object, manifest: str | os.PathLike, field: str) -> Path:
    """``root / rel`` if ``rel`` is relative, has no ``..`` and resolves (symlinks followed) inside ``root``."""
    path = Path(root) / _relative_parts(manifest, field, rel)
    if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root)):
        raise InstSynthError(manifest, f"field {field!r}: {rel!r} resolves outside {root} (symlink?)")
    return path


def within(root: str | os.PathLike, value: object, manifest: str | os.PathLike, field: str) -> Path:
    """The path ``value`` (absolute, or relative to ``root``) if it resolves (symlinks followed) inside ``root``."""
    if not isinstance(value, str) or not value or "\x00" in value:
        raise InstSynthError(manifest, f"field {field!r}: {value!r} is not a path")
    path = Path(root) / value
    if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root)):
        raise InstSynthError(manifest, f"field {field!r}: {value!r} is not inside {root}")
    return path


def entry_folders(manifest: str | os.PathLike, where: str, entry: dict, plain_city: bool = True) -> tuple[str, str]:
    """(split, city) of a manifest entry: ``split`` a plain name, ``city`` a plain name (Cityscapes) or,
    with ``plain_city=False``, a relative path (COCO / folder sub-folders); ``where`` names the entry."""
    split = plain_name(manifest, f"{where}.split", entry.get("split"))
    city = (plain_name if plain_city else relative_name)(manifest, f"{where}.city", entry.get("city"))
    return split, city


def output_file(out: str | os.PathLike, parts: Iterable[str], manifest: str | os.PathLike, field: str) -> Path:
    """The output file ``out / part / ...`` (parts from manifest names) if it stays inside ``out``."""
    return confined(out, "/".join(parts), manifest, field)


def removable(root: str | os.PathLike, rel: object, suffixes: Iterable[str], manifest: str | os.PathLike,
              field: str, folder_suffixes: Iterable[str] = ("",)) -> Path | None:
    """The file ``root / rel`` if a stage may delete it as stale: confined to ``root``, a regular file
    (not a symlink) with one of ``suffixes``, under a folder (below ``root``) whose name ends with one of
    ``folder_suffixes`` (e.g. ``_syn``: ``leftImg8bit/train/aachen_syn/``, ``images/instsynth_syn/``);
    None when it does not exist. Anything else raises InstSynthError."""
    path = confined(root, rel, manifest, field)
    if not path.is_file() and not path.is_symlink():
        return None
    folders = PurePosixPath(str(rel)).parts[:-1]
    if (path.is_symlink() or not path.name.endswith(tuple(suffixes))
            or not any(f.endswith(tuple(folder_suffixes)) for f in folders or ("",))):
        raise InstSynthError(manifest, f"field {field!r}: {rel!r} is not a file this stage writes; not deleting it")
    return path


def remove_stale_files(root: str | os.PathLike, records: Iterable[tuple[str, object]], suffixes: Iterable[str],
                       manifest: str | os.PathLike, folder_suffixes: Iterable[str] = ("",)) -> list[Path]:
    """Delete the stale outputs ``records`` (``(field, relative path)`` pairs from ``manifest``) under ``root``.

    Every one is checked with :func:`removable` first; one that is not removable raises and nothing is
    deleted. Returns the files deleted."""
    suffixes, folder_suffixes = tuple(suffixes), tuple(folder_suffixes)
    paths = [removable(root, rel, suffixes, manifest, field, folder_suffixes) for field, rel in records]
    gone = [p for p in paths if p is not None]
    for path in gone:
        path.unlink(missing_ok=True)
    return gone


def _inside(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b)


def check_disjoint(inputs: Iterable[str | os.PathLike], out: str | os.PathLike, what: str = "output folder") -> None:
    """Refuse an output folder equal to or inside one of ``inputs``, or containing one, before anything is written."""
    real_out = Path(os.path.realpath(out))
    for source in inputs:
        real_in = Path(os.path.realpath(source))
        if _inside(real_out, real_in):
            raise InstSynthError(out, f"the {what} is inside the input {source}; choose a folder outside the dataset")
        if _inside(real_in, real_out):
            raise InstSynthError(out, f"the {what} contains the input {source}; choose a folder outside the dataset")
