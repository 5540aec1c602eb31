"""File I/O shared by every stage: atomic writes, Cityscapes naming, clear errors, progress bars.

Conventions:
- every file is written to a temporary name in the target folder and renamed into place, so an
  interrupted run never leaves a half-written PNG or JSON;
- bad input raises :class:`InstSynthError`, whose message starts with the offending path;
- a write the machine refuses (full disk, read-only or permission-denied folder) raises
  :class:`OutputError`, which ``--skip-bad`` never skips;
- long loops use :func:`progress` (tqdm on stderr, disabled with ``INSTSYNTH_NO_PROGRESS=1``).
"""
from __future__ import annotations

import contextlib
import errno
import filecmp
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import cv2
import numpy as np

LEFT_SUFFIX = "_leftImg8bit.png"
GT_SUFFIXES = {
    "instanceIds": "_gtFine_instanceIds.png",
    "labelIds": "_gtFine_labelIds.png",
    "color": "_gtFine_color.png",
    "polygons": "_gtFine_polygons.json",
}
GENERATED_FOLDER_SUFFIXES = ("_syn", "_inpainted")
"""City folders ending in these are written by InstSynth stages and skipped as sources."""

TEMP_PREFIX = ".instsynth-tmp-"
"""Every temporary file of an atomic write is ``.instsynth-tmp-<name>.<random><suffix>``."""

_UMASK = os.umask(0o022)
os.umask(_UMASK)
_IMAGE_ID = re.compile(r"^(?P<city>.+)_(?P<seq>\d+)_(?P<frame>\d+)$")


class InstSynthError(Exception):
    """Bad input or output: the message names the file and what is wrong with it."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):  # picklable, so errors cross worker-process boundaries intact
        return type(self), (self.path, self.problem)


def get_logger(name: str = "instsynth") -> logging.Logger:
    """The project logger (``instsynth.*``), printing ``LEVEL message`` to stderr once configured."""
    root = logging.getLogger("instsynth")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s] %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("INSTSYNTH_LOG_LEVEL", "INFO"))
        root.propagate = False
    return logging.getLogger(name)


def progress(iterable: Iterable, desc: str, total: int | None = None, **kwargs) -> Iterator:
    """tqdm progress bar with the project's conventions (stderr, off with INSTSYNTH_NO_PROGRESS=1)."""
    from tqdm.auto import tqdm

    disable = os.environ.get("INSTSYNTH_NO_PROGRESS", "") not in ("", "0")
    return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, **kwargs)


def default_workers() -> int:
    """Worker processes to use by default: every core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------- atomic writes
class OutputError(OSError):
    """A write the machine refused (full disk, read-only or permission-denied folder).

    An ``OSError`` (errno kept) rather than an :class:`InstSynthError`, so that ``--skip-bad``
    handlers, which skip bad *input*, let it stop the run. The message names the file being written.
    """

    def __init__(self, path: str | os.PathLike, problem: str, code: int | None = None):
        self.path, self.problem = Path(path), problem
        super().__init__(code, problem, str(path))

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"

    def __reduce__(self):  # picklable, so errors cross worker-process boundaries intact
        return type(self), (self.path, self.problem, self.errno)


_RERUN = "finished files are kept"
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_REFUSED = (errno.EROFS, errno.EACCES, errno.EPERM)


def _existing_folder(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (where a refused write was tried)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_mb(path: str | os.PathLike) -> float:
    """Free space in MB on the file system holding ``path`` (or its nearest existing ancestor)."""
    return shutil.disk_usage(_existing_folder(Path(path))).free / 2**20


def output_error(path: str | os.PathLike, exc: OSError) -> OSError:
    """The :class:`OutputError` for ``exc`` raised while writing ``path``; ``exc`` itself when it is
    about another file (e.g. an unreadable source being copied) or not a refused write."""
    path = Path(path)
    if isinstance(exc, OutputError) or exc.errno not in _FULL + _REFUSED:
        return exc
    if exc.filename is not None:
        named = Path(os.path.abspath(exc.filename))
        target = Path(os.path.abspath(path))
        if named != target and named not in target.parents and named.parent != target.parent:
            return exc
    folder = _existing_folder(path.parent)
    if exc.errno in _FULL:
        what = "no space left on device" if exc.errno == errno.ENOSPC else exc.strerror.lower()
        problem = f"{what} ({free_mb(folder):.1f} MB free; rerun after freeing space: {_RERUN})"
    elif exc.errno == errno.EROFS:
        problem = f"{folder} is read-only (make it writable or choose another output folder, then rerun: {_RERUN})"
    else:
        problem = (f"permission denied: {folder} is not writable by this user (fix its permissions or choose "
                   f"another output folder, then rerun: {_RERUN})")
    return OutputError(path, problem, exc.errno)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    On failure the temporary file is removed; a write the machine refuses raises :class:`OutputError`
    (also a writer's errno-less RuntimeError, as torch.save raises, when under 1 MB is left).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=path.suffix, dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.close(fd)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        refused = exc
        if tmp is not None and type(exc) is RuntimeError and free_mb(tmp) < 1:  # e.g. torch.save: no errno
            refused = OSError(errno.ENOSPC, "No space left on device")
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        error = output_error(path, refused) if isinstance(refused, OSError) else exc
        if error is exc:
            raise
        raise error from exc


def save_torch(data, path: str | os.PathLike) -> Path:
    """``torch.save(data)`` to ``path`` atomically; a full disk is reported as such by :func:`atomic_path`
    (torch's error has no errno)."""
    import torch

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return path


def write_if_changed(path: str | os.PathLike, data: bytes) -> bool:
    """Write ``data`` to ``path`` atomically unless the file already holds exactly it; True if written."""
    path = Path(path)
    with contextlib.suppress(OSError):
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    with atomic_path(path) as tmp, open(tmp, "r+b") as file:  # not "wb": on ext4, truncating the new temporary
        file.write(data)  # file makes its close flush it to disk (auto_da_alloc), 1.5-2x the cost of a small write
    return True


class _Unchanged(Exception):
    """The streamed file holds what ``path`` already held (its temporary copy is dropped)."""


def _same_bytes(a: Path, b: Path) -> bool:
    """True when the files ``a`` and ``b`` hold the same bytes (False if ``b`` is missing)."""
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def write_pieces_if_changed(path: str | os.PathLike, pieces: Iterable[str | bytes]) -> bool:
    """:func:`write_if_changed` of the concatenation of ``pieces`` (str as UTF-8), streamed to the temporary
    file, so that the whole content is never held in memory; True if written."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "r+b") as file:
                for piece in pieces:
                    file.write(piece.encode() if isinstance(piece, str) else piece)
            if _same_bytes(tmp, path):
                raise _Unchanged
    except _Unchanged:
        return False
    return True


JSON_BATCH = 2000
"""Items of a long list encoded by one ``json.dumps`` call in :func:`json_pieces`."""


def json_pieces(obj: dict, batch: int = JSON_BATCH) -> Iterator[str]:
    """``json.dumps(obj)`` (default separators) in pieces: long top-level lists ``batch`` items at a time.

    The concatenation is byte for byte ``json.dumps(obj)``; only one batch is encoded at a time."""
    yield "{"
    for n, (key, value) in enumerate(obj.items()):
        yield (", " if n else "") + json.dumps(str(key)) + ": "
        if isinstance(value, list) and len(value) > batch:
            yield "["
            for start in range(0, len(value), batch):
                yield (", " if start else "") + json.dumps(value[start:start + batch])[1:-1]
            yield "]"
        else:
            yield json.dumps(value)
    yield "}"


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; a file that already holds exactly ``data`` is left untouched."""
    write_if_changed(path, data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON atomically (UTF-8, trailing newline)."""
    return write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())


MAX_JSON_BYTES = int(os.environ.get("INSTSYNTH_MAX_JSON_MB", "4096")) * 2**20
"""Largest JSON file read (``INSTSYNTH_MAX_JSON_MB``, default 4096): a bigger one is refused unread."""


def read_json(path: str | os.PathLike, digest: Any = None) -> Any:
    """Read a JSON file; a missing, malformed, over-deep or over-large file raises InstSynthError naming it.

    ``digest`` (a hashlib object) is updated with the exact bytes parsed (one read for both)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise InstSynthError(path, f"JSON file over {MAX_JSON_BYTES // 2**20} MB (INSTSYNTH_MAX_JSON_MB)")
        if digest is None:
            return json.loads(path.read_text())
        data = path.read_bytes()
        digest.update(data)
        text = data.decode()
        del data  # not held while parsing: a large file's bytes are as large as its text
        return json.loads(text)
    except FileNotFoundError:
        raise InstSynthError(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InstSynthError(path, f"not valid JSON ({exc})") from None
    except RecursionError:
        raise InstSynthError(path, "not valid JSON (nested too deeply)") from None


def read_yaml(path: str | os.PathLike, missing: str = "file not found", error: type = InstSynthError) -> Any:
    """Read a YAML file (an empty file reads as ``{}``); a missing or malformed file raises ``error`` naming it."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise error(path, missing) from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise error(path, f"not valid YAML ({exc})") from None
    return {} if data is None else data


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an 8-bit/16-bit gray or RGB array (RGB order, like PIL)."""
    image = np.ascontiguousarray(image)
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"PNG needs uint8 or uint16, got {image.dtype}")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR if image.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:  # pragma: no cover - OpenCV failure
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an RGB or label array as PNG atomically (uint16 stays 16-bit, as Cityscapes instanceIds)."""
    return write_bytes(path, encode_png(image))


MAX_PIXELS_ENV = "INSTSYNTH_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 100_000_000
"""Largest image read (width x height), checked from the file header before decoding: 100 MP, far
above Cityscapes (2 MP) and LVIS/COCO (< 1 MP); ``--max-pixels`` or ``INSTSYNTH_MAX_PIXELS`` change it."""


def max_pixels() -> int:
    """The image-size cap in pixels (``INSTSYNTH_MAX_PIXELS``, default :data:`DEFAULT_MAX_PIXELS`)."""
    try:
        return int(float(os.environ.get(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS)))
    except ValueError:
        raise InstSynthError(MAX_PIXELS_ENV, f"not a number: {os.environ[MAX_PIXELS_ENV]!r}") from None


def check_image_size(path: str | os.PathLike) -> None:
    """Refuse an image whose header declares more than :func:`max_pixels` pixels (nothing is decoded)."""
    from PIL import Image

    cap = max_pixels()
    with open(path, "rb") as f:
        head = f.read(24)
    try:
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":  # PNG: the IHDR chunk, no decoder
            width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        else:
            with Image.open(path) as im:
                width, height = im.size
    except Image.DecompressionBombError:  # PIL's own limit (2 x MAX_IMAGE_PIXELS): over ours unless raised
        if Image.MAX_IMAGE_PIXELS is None or cap < 2 * Image.MAX_IMAGE_PIXELS:
            raise InstSynthError(path, f"image header declares over {cap} pixels (--max-pixels / "
                                       f"{MAX_PIXELS_ENV}); skipped with --skip-bad") from None
        return
    except Exception:  # noqa: BLE001 (unknown or corrupt header: the decoder reports it)
        return
    if width * height > cap:
        raise InstSynthError(path, f"image of {width}x{height} pixels exceeds the cap of {cap} "
                                   f"(--max-pixels / {MAX_PIXELS_ENV}); skipped with --skip-bad")


def read_png(path: str | os.PathLike, *, rgb: bool = False, dtype: Any = None,
             shape: tuple[int, int] | None = None, bgr: bool = False) -> np.ndarray:
    """Read a PNG unchanged (16-bit kept); ``rgb=True`` returns (H, W, 3) RGB.

    ``bgr=True`` (with ``rgb=True``) keeps OpenCV's BGR order, for code that only cuts pixels and
    re-encodes them with OpenCV (it saves converting the whole image).

    Raises InstSynthError naming the file when it is missing, corrupt or truncated, or when
    ``dtype`` / ``shape`` (height, width) do not match.
    """
    path = Path(path)
    if not path.is_file():
        raise InstSynthError(path, "file not found")
    check_image_size(path)
    data = np.fromfile(path, np.uint8)
    flags = cv2.IMREAD_COLOR if rgb else cv2.IMREAD_UNCHANGED
    try:
        image = cv2.imdecode(data, flags) if data.size else None
    except cv2.error as exc:
        raise InstSynthError(path, f"cannot decode image ({str(exc).strip().splitlines()[-1]})") from None
    if image is None:
        raise InstSynthError(path, "cannot decode image (corrupt or truncated PNG?)")
    if rgb:
        if not bgr:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB if image.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    if dtype is not None and image.dtype != np.dtype(dtype):
        raise InstSynthError(path, f"expected {np.dtype(dtype)} pixels, found {image.dtype}")
    if shape is not None and image.shape[:2] != tuple(shape):
        raise InstSynthError(path, f"expected size {shape[1]}x{shape[0]}, found {image.shape[1]}x{image.shape[0]}")
    return image


# --------------------------------------------------------------------------- Cityscapes naming
@dataclass(frozen=True)
class CityscapesImage:
    """One annotated Cityscapes image: ``root/{leftImg8bit,gtFine}/split/city/<image_id>_...``."""

    root: Path
    split: str
    city: str
    image_id: str  # e.g. aachen_000000_000019

    @property
    def left(self) -> Path:
        return self.root / "leftImg8bit" / self.split / self.city / f"{self.image_id}{LEFT_SUFFIX}"

    def gt(self, kind: str = "instanceIds") -> Path:
        """Path of a gtFine file: kind is instanceIds, labelIds, color or polygons."""
        return self.root / "gtFine" / self.split / self.city / f"{self.image_id}{GT_SUFFIXES[kind]}"

    def relative(self, path: Path) -> str:
        """``path`` relative to the dataset root, with forward slashes."""
        return Path(path).relative_to(self.root).as_posix()


def left_path(root, split: str, city: str, image_id: str) -> Path:
    return CityscapesImage(Path(root), split, city, image_id).left


def gt_path(root, split: str, city: str, image_id: str, kind: str = "instanceIds") -> Path:
    return CityscapesImage(Path(root), split, city, image_id).gt(kind)


def image_id_of(path: str | os.PathLike) -> str:
    """``aachen_000000_000019`` from any Cityscapes file name of that image."""
    name = Path(path).name
    for suffix in (LEFT_SUFFIX, *GT_SUFFIXES.values()):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise InstSynthError(path, "not a Cityscapes file name (<city>_<seq>_<frame>_<suffix>)")


def split_image_id(image_id: str) -> tuple[str, str, str]:
    """(city, seq, frame) of an image id; the city may itself contain underscores."""
    match = _IMAGE_ID.match(image_id)
    if not match:
        raise ValueError(f"{image_id!r} is not a Cityscapes image id (<city>_<seq>_<frame>)")
    return match["city"], match["seq"], match["frame"]


def is_generated_folder(city_folder: str) -> bool:
    """True for city folders written by InstSynth stages (``*_syn``, ``*_inpainted``)."""
    return city_folder.endswith(GENERATED_FOLDER_SUFFIXES)


def count_generated_images(root: str | os.PathLike, splits: Sequence[str]) -> dict[str, int]:
    """``{split: n}``: images (``_gtFine_instanceIds.png``) in InstSynth's ``gtFine/<split>/*_syn`` city folders."""
    counts = {}
    for split in splits:
        split_dir = Path(root) / "gtFine" / split
        cities = [p for p in split_dir.iterdir() if p.is_dir() and is_generated_folder(p.name)] if split_dir.is_dir() else []
        counts[split] = sum(1 for city in cities for _ in city.glob("*" + GT_SUFFIXES["instanceIds"]))
    return counts


def report_generated_images(log: logging.Logger, root: str | os.PathLike, splits: Sequence[str], stage: str) -> dict[str, int]:
    """Log in one line how many synthetic images ``root`` holds per split; warn when there are none."""
    counts = count_generated_images(root, splits)
    found = ", ".join(f"{split} {n}" for split, n in counts.items())
    if sum(counts.values()):
        log.info("%s: synthetic images (gtFine/<split>/*_syn) in %s: %s", stage, root, found)
    else:
        log.warning("%s: no synthetic images in %s (no gtFine/<split>/*_syn/*_gtFine_instanceIds.png; %s): "
                    "inpainted_integration.py --output_folder_name must be this same folder", stage, root, found)
    return counts


def iter_cityscapes_images(root: str | os.PathLike, split: str, *, include_generated: bool = False
                           ) -> list[CityscapesImage]:
    """Every annotated image of a split, sorted, found by its ``_gtFine_instanceIds.png``.

    Any city folder name works. Folders written by InstSynth (``*_syn``) are skipped unless
    ``include_generated``. A missing ``gtFine/<split>`` folder raises InstSynthError.
    """
    root = Path(root)
    split_dir = root / "gtFine" / split
    if not split_dir.is_dir():
        raise InstSynthError(split_dir, "folder not found (expected a Cityscapes tree: gtFine/<split>/<city>/)")
    images = []
    for city_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if is_generated_folder(city_dir.name) and not include_generated:
            continue
        for f in sorted(city_dir.glob("*" + GT_SUFFIXES["instanceIds"])):
            images.append(CityscapesImage(root, split, city_dir.name, image_id_of(f)))
    return images
