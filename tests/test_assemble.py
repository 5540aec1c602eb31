"""Stage 3 (move_folder_clean_ver.py): the output dataset gets the original splits, safely and idempotently."""
import errno
import hashlib
import os
import subprocess
import sys

import pytest

from conftest import REPO
from instsynth.stages import assemble
from instsynth.stages.assemble import assemble_dataset
from instsynth.core.io import InstSynthError, OutputError


def _tree(root):
    """{relative path: sha1} of every file under root."""
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def src(demo_copy):
    """The demo tree plus a test split with an unusual city name and a generated (_syn) city folder."""
    for top, name in (("leftImg8bit", "x_leftImg8bit.png"), ("gtFine", "x_gtFine_instanceIds.png")):
        odd = demo_copy / top / "test" / "san-josé 2"
        odd.mkdir(parents=True)
        (odd / name).write_bytes(b"test split file")
        syn = demo_copy / top / "train" / "ashford_syn"
        syn.mkdir()
        (syn / name).write_bytes(b"generated")
    return demo_copy


def _originals(tree):
    return {k: v for k, v in tree.items() if "_syn/" not in k}


def test_hard_links_every_split_and_rerun_skips(src, tmp_path):
    before = _tree(src)
    dst = tmp_path / "out"
    report = assemble_dataset(src, dst)
    expected = _originals(before)
    assert _tree(dst) == expected  # train, val and test; the _syn folder is not an original split
    assert report["splits"] == ["train", "val", "test"]
    assert report["linked"] == report["files"] == len(expected)
    for rel in expected:
        assert os.path.samefile(src / rel, dst / rel)
    again = assemble_dataset(src, dst)
    assert again["skipped"] == len(expected) and again["linked"] == 0
    assert _tree(src) == before


def test_include_generated_adds_syn_folders(src, tmp_path):
    dst = tmp_path / "out"
    assemble_dataset(src, dst, include_generated=True)
    assert (dst / "gtFine/train/ashford_syn/x_gtFine_instanceIds.png").read_bytes() == b"generated"


def test_copy_mode_is_independent_idempotent_and_replaces_stale_files(src, tmp_path):
    dst = tmp_path / "out"
    report = assemble_dataset(src, dst, mode="copy")
    assert report["copied"] == report["files"]
    rel = "gtFine/test/san-josé 2/x_gtFine_instanceIds.png"
    assert not os.path.samefile(src / rel, dst / rel)
    (dst / rel).write_bytes(b"stale file")  # same size as the source, different bytes
    again = assemble_dataset(src, dst, mode="copy")
    assert again["copied"] == 1 and again["skipped"] == report["files"] - 1
    assert (dst / rel).read_bytes() == b"test split file"
    assert _tree(dst) == _originals(_tree(src))


def test_symlink_mode(src, tmp_path):
    dst = tmp_path / "out"
    assemble_dataset(src, dst, mode="symlink")
    rel = "leftImg8bit/val/corvallis"
    files = list((dst / rel).iterdir())
    assert files and all(p.is_symlink() and os.path.samefile(p, src / rel / p.name) for p in files)
    assert assemble_dataset(src, dst, mode="symlink")["symlinked"] == 0


def test_link_falls_back_to_copy_across_devices(src, tmp_path, monkeypatch):
    def no_link(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(assemble.os, "link", no_link)
    dst = tmp_path / "out"
    report = assemble_dataset(src, dst)
    assert report["copied"] == report["files"] and report["linked"] == 0
    assert _tree(dst) == _originals(_tree(src))


def test_interrupted_copy_leaves_no_partial_file(src, tmp_path, monkeypatch):
    def broken_copy(a, b):
        with open(b, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(assemble.shutil, "copyfile", broken_copy)
    dst = tmp_path / "out"
    with pytest.raises(OutputError, match="no space left on device"):  # not InstSynthError: --skip-bad never skips it
        assemble_dataset(src, dst, mode="copy")
    assert not [p for p in dst.rglob("*") if p.is_file()]


def test_bad_paths(src, tmp_path):
    with pytest.raises(InstSynthError, match="not found"):
        assemble_dataset(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(InstSynthError, match="inside the source"):
        assemble_dataset(src, src / "gtFine" / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InstSynthError, match="no split folder"):
        assemble_dataset(tmp_path / "empty", tmp_path / "out")


def test_cli_keeps_paper_flags(src, tmp_path):
    dst = tmp_path / "out"
    res = subprocess.run([sys.executable, str(REPO / "move_folder_clean_ver.py"), "--src_path", str(src),
                          "--des_path", str(dst), "--mode", "copy", "--splits", "val"],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "INSTSYNTH_NO_PROGRESS": "1"})
    assert res.returncode == 0, res.stderr
    assert "copied: 30" in res.stdout
    assert sorted(p.name for p in (dst / "gtFine").iterdir()) == ["val"]
    bad = subprocess.run([sys.executable, str(REPO / "move_folder_clean_ver.py"), "--src_path", str(tmp_path / "nope"),
                          "--des_path", str(dst)], capture_output=True, text=True)
    assert bad.returncode != 0 and "nope: source dataset folder not found" in bad.stderr


def test_counts_synthetic_images_of_the_destination_and_warns_when_none(src, tmp_path, caplog):
    dst = tmp_path / "out"
    with caplog.at_level("INFO", logger="instsynth"):
        report = assemble_dataset(src, dst)
    assert report["synthetic_images"] == {"train": 0, "val": 0, "test": 0}
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "no synthetic images in" in warned[0] and "--output_folder_name" in warned[0]
    caplog.clear()
    syn = dst / "gtFine" / "train" / "ashford_syn"  # what stage 2 writes into the same folder
    syn.mkdir(parents=True)
    for n in range(2):
        (syn / f"ashford_000000_00000{n}_gtFine_instanceIds.png").write_bytes(b"x")
    with caplog.at_level("INFO", logger="instsynth"):
        report = assemble_dataset(src, dst)
    assert report["synthetic_images"] == {"train": 2, "val": 0, "test": 0}
    said = [r.getMessage() for r in caplog.records if "synthetic images" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith("train 2, val 0, test 0")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
