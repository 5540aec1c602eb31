"""Issue 19: hostile manifests and inputs end in one ``error:`` line (exit 1) or a counted skip; nothing is
written or deleted outside the output root; one writer per output folder; the project's temporaries only.

Each reproduction of the issue runs the root scripts as a subprocess."""
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from conftest import REPO
from instsynth.core.lock import output_lock, remove_temp_files
from instsynth.core.paths import (check_disjoint, confined, entry_folders, output_file, plain_name, relative_name,
                                  remove_stale_files, removable, within)
from instsynth.generation import GenerationSettings, generate_instances
from instsynth.core.io import InstSynthError, atomic_path, read_json
from instsynth.stages.selection import METADATA_NAME, select_coco_instances, select_instances

PY = sys.executable


def cli(*args, env=None, **kw):
    full = dict(os.environ, PYTHONPATH=str(REPO), INSTSYNTH_NO_PROGRESS="1", **(env or {}))
    full.pop("INSTSYNTH_DEBUG", None)
    return subprocess.run([PY, *map(str, args)], capture_output=True, text=True, env=full, timeout=300, **kw)


def one_error(res, *needles):
    """Exit 1, no traceback, the last stderr line is one ``error:`` line holding every needle."""
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), res.stderr[-2000:]
    for needle in needles:
        assert needle in last, last
    return last


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(p.relative_to(folder).as_posix().encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.fixture
def stage1(demo_copy, tmp_path):
    """Stage 1 and recolor (1 sample) on a private demo copy."""
    select_instances(demo_copy, out=tmp_path / "sel", workers=1)
    generate_instances(tmp_path / "sel" / METADATA_NAME, settings=GenerationSettings(mode="recolor"))
    return {"root": demo_copy, "sel": tmp_path / "sel", "gen": tmp_path / "sel" / "Recolor", "tmp": tmp_path}


@pytest.fixture(scope="module")
def coco_export(demo_root, tmp_path_factory) -> dict:
    """The demo tree exported as COCO files, from a private copy (the export converts its source tree in place)."""
    from instsynth.stages.demo_dataset import export_coco

    base = tmp_path_factory.mktemp("coco_export")
    shutil.copytree(demo_root, base / "cityscapes")
    return export_coco(base / "cityscapes", base / "coco", workers=1)


# --------------------------------------------------------------------------- 1. confinement
def test_confinement_helpers(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside.txt").write_text("x")
    (root / "link").symlink_to(tmp_path / "outside.txt")
    for bad in ("../outside.txt", "/etc/passwd", "a/../../outside.txt", "link", "", "a\\..\\b"):
        with pytest.raises(InstSynthError, match="m.json: field 'f'"):
            confined(root, bad, "m.json", "f")
    assert confined(root, "a/b.png", "m.json", "f") == root / "a/b.png"
    for bad in ("..", "a/b", "", ".", "x\\y", None, 3):
        with pytest.raises(InstSynthError, match="not a plain folder name"):
            plain_name("m.json", "split", bad)
    assert relative_name("m.json", "city", "a/b") == "a/b"
    assert within(root, str(root / "x.png"), "m.json", "f") == root / "x.png"
    with pytest.raises(InstSynthError, match="is not inside"):
        within(root, str(tmp_path / "outside.txt"), "m.json", "f")


def test_entry_folders_and_output_files_stay_in_the_output(tmp_path):
    assert entry_folders("m.json", "images[0]", {"split": "train", "city": "aachen"}) == ("train", "aachen")
    assert entry_folders("m.json", "e", {"split": "train", "city": "a/b"}, plain_city=False) == ("train", "a/b")
    for entry in ({"split": "../../../../elsewhere/train", "city": "a"}, {"split": "train", "city": "../x"},
                  {"split": "train", "city": "a/b"}, {"city": "a"}):
        with pytest.raises(InstSynthError, match=r"m.json: field 'e\.(split|city)'"):
            entry_folders("m.json", "e", entry)
    with pytest.raises(InstSynthError, match="'e.city'"):
        entry_folders("m.json", "e", {"split": "train", "city": "a/../../x"}, plain_city=False)
    assert output_file(tmp_path, ["leftImg8bit", "train", "a_syn", "x.png"], "m.json", "f") == \
        tmp_path / "leftImg8bit/train/a_syn/x.png"
    with pytest.raises(InstSynthError):
        output_file(tmp_path, ["leftImg8bit", "..", "..", "x.png"], "m.json", "f")


def test_stale_removal_deletes_only_recorded_files_of_its_kind_and_all_or_nothing(tmp_path):
    (tmp_path / "a_syn").mkdir()
    ours, notes = tmp_path / "a_syn/x.png", tmp_path / "my_notes.txt"
    ours.write_bytes(b"png")
    notes.write_text("mine")
    (tmp_path / "orig").mkdir()
    original = tmp_path / "orig/y.png"
    original.write_bytes(b"png")
    with pytest.raises(InstSynthError, match="not a file this stage writes"):
        removable(tmp_path, "my_notes.txt", (".png",), "m.json", "outputs")
    assert removable(tmp_path, "a_syn/gone.png", (".png",), "m.json", "outputs") is None
    for bad in ("my_notes.txt", "orig/y.png", "../victim.png"):
        with pytest.raises(InstSynthError, match="m.json: field 'outputs.1'"):
            remove_stale_files(tmp_path, [("outputs.0", "a_syn/x.png"), ("outputs.1", bad)], (".png",), "m.json",
                               ("_syn",))
        assert ours.exists()  # checked before anything is deleted
    assert remove_stale_files(tmp_path, [("o", "a_syn/x.png"), ("o", "a_syn/gone.png")], (".png",), "m.json",
                              ("_syn",)) == [ours]
    assert not ours.exists() and notes.read_text() == "mine" and original.exists()
    coco = tmp_path / "images/instsynth_syn/train/city/x.png"  # a COCO / folder output's new image
    coco.parent.mkdir(parents=True)
    coco.write_bytes(b"png")
    assert removable(tmp_path, "images/instsynth_syn/train/city/x.png", (".png",), "m.json", "f", ("_syn",)) == coco
    with pytest.raises(InstSynthError, match="leaves its folder"):
        removable(tmp_path, "images/instsynth_syn/../../../victim.txt", (".png",), "m.json", "f", ("_syn",))


@pytest.mark.parametrize("field,value", [("split", "../../../../elsewhere/train"), ("city", "../../elsewhere")])
def test_metadata_path_fields_cannot_leave_the_output(stage1, field, value):
    meta = stage1["sel"] / METADATA_NAME
    if field == "split":
        edit_json(meta, lambda d: d.update(split=value))
    else:
        edit_json(meta, lambda d: d["instances"][0].update(city=value))
    before = tree_hash(stage1["tmp"])
    gen = cli(REPO / "generation/instance_generation.py", "--mode", "recolor", "--metadata", meta,
              "--folder", stage1["tmp"] / "gen2")
    one_error(gen, str(meta), repr(value))
    integ = cli(REPO / "inpainted_integration.py", "--inpainting_dir", stage1["gen"], "--metadata_path", meta,
                "--output_folder_name", stage1["tmp"] / "out")
    one_error(integ, str(meta), repr(value))
    assert not (stage1["tmp"].parent / "elsewhere").exists()
    assert tree_hash(stage1["tmp"]) == before


def test_manifest_fields_cannot_leave_their_folder(stage1):
    manifest = stage1["gen"] / "generation.json"
    saved = manifest.read_text()
    for change, value in ((lambda e: e["samples"].__setitem__(0, "../../../x.png"), "'../../../x.png'"),
                          (lambda e: e.update(split="../../elsewhere"), "'../../elsewhere'")):
        edit_json(manifest, lambda d: change(next(iter(d["instances"].values()))))
        res = cli(REPO / "inpainted_integration.py", "--inpainting_dir", stage1["gen"],
                  "--output_folder_name", stage1["tmp"] / "out")
        one_error(res, str(manifest), value)
        manifest.write_text(saved)
    assert not (stage1["tmp"] / "out").exists()


def test_stage4_coordinates_stay_in_their_folder_and_the_dataset(stage1, tmp_path):
    out = tmp_path / "lab"
    out.mkdir()
    coords = out / "cropped_region_coordinates.json"
    src = {k: str(stage1["root"] / f"gtFine/train/x/x_000000_000000_gtFine_{k}.png") for k in ("labelIds", "color")}
    entry = {"image_id": "x", "bbox_coordinate": [0, 0, 1, 1], "size": [1, 1], "source": src,
             "output": {"labelIds": "../../victim_labelIds.png", "color": "gtFine/train/x_syn/c.png"}}
    coords.write_text(json.dumps({"version": 1, "dataset_root": str(stage1["root"]), "images": [entry]}))
    res = cli(REPO / "drop_color_and_labelIds_clean_ver.py", "--cropped_region_coordinates_path", coords)
    one_error(res, str(coords), "images[0].output.labelIds", "leaves its folder")
    entry["output"]["labelIds"], entry["source"]["color"] = "gtFine/train/x_syn/l.png", "/etc/passwd"
    coords.write_text(json.dumps({"version": 1, "dataset_root": str(stage1["root"]), "images": [entry]}))
    res = cli(REPO / "drop_color_and_labelIds_clean_ver.py", "--cropped_region_coordinates_path", coords)
    one_error(res, str(coords), "images[0].source.color", "is not inside")


def test_cityscapes_stale_removal_deletes_only_its_own_files(stage1):
    out = stage1["tmp"] / "out"
    assert cli(REPO / "inpainted_integration.py", "--inpainting_dir", stage1["gen"], "--output_folder_name", out,
               "--crops_per_sample", "1").returncode == 0
    notes = out / "my_notes.txt"
    notes.write_text("mine")
    original = out / "gtFine/train/x/x_000000_000000_gtFine_instanceIds.png"
    original.parent.mkdir(parents=True)
    original.write_bytes(b"png")
    for outputs in ({"leftImg8bit": "my_notes.txt"}, {"instanceIds": str(original.relative_to(out))},
                    {"leftImg8bit": "../../victim.png"}):
        edit_json(out / "integration.json", lambda d: d["images"].append({"image_id": "fake_000000_000000",
                                                                         "outputs": outputs}))
        res = cli(REPO / "inpainted_integration.py", "--inpainting_dir", stage1["gen"],
                  "--output_folder_name", out, "--crops_per_sample", "1")
        one_error(res, "integration.json", "fake_000000_000000")
        edit_json(out / "integration.json", lambda d: d["images"].pop())
    assert notes.read_text() == "mine" and original.read_bytes() == b"png"


def test_coco_stale_removal_stays_inside_the_output(coco_export, tmp_path):
    work, out = tmp_path / "sel", tmp_path / "out"
    select_coco_instances(coco_export["train"], coco_images(coco_export), out=work, workers=1)
    generate_instances(work / METADATA_NAME, settings=GenerationSettings(mode="recolor"))
    args = (REPO / "inpainted_integration.py", "--inpainting_dir", work / "Recolor", "--output_folder_name", out,
            "--crops_per_sample", "0")
    assert cli(*args).returncode == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    edit_json(out / "integration.json", lambda d: d["images"].append({**d["images"][0],
                                                                     "file_name": "instsynth_syn/../../../victim.txt"}))
    one_error(cli(*args), "integration.json", "victim.txt")
    assert victim.read_text() == "keep"


def test_copy_paste_stale_removal_deletes_only_its_own_files(demo_copy, tmp_path):
    out = tmp_path / "cp"
    args = ("-m", "instsynth.copy_paste", "--dataset", demo_copy, "--out", out, "--workers", "1")
    assert cli(*args, "--num_images", "1").returncode == 0
    notes = out / "my_notes.txt"
    notes.write_text("mine")
    edit_json(out / "copy_paste.json", lambda d: d["images"].append({"image_id": "fake", "outputs": {"leftImg8bit": "my_notes.txt"}}))
    one_error(cli(*args, "--num_images", "1"), "copy_paste.json", "'my_notes.txt'", "not a file this stage writes")
    assert notes.read_text() == "mine"
    one_error(cli("-m", "instsynth.copy_paste", "--dataset", demo_copy, "--out", demo_copy / "gtFine" / "cp",
                  "--num_images", "1"), "is inside the input")


# --------------------------------------------------------------------------- 5. output and input overlap
def test_stage1_refuses_an_output_overlapping_the_dataset_before_writing(demo_copy, tmp_path):
    before = tree_hash(demo_copy)
    for out in (demo_copy, demo_copy / "gtFine" / "sel", tmp_path):
        res = cli(REPO / "process_clean_ver.py", "--train_folder", demo_copy, "--out", out, "--workers", "1")
        one_error(res, str(out), "the input", "choose a folder outside the dataset")
    res = cli(REPO / "process_clean_ver.py", "--train_folder", demo_copy, "--workers", "1")  # default: beside it
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "cityscapes_selection_train" / METADATA_NAME).is_file()
    gen = cli(REPO / "generation/instance_generation.py", "--mode", "recolor", "--folder",
              tmp_path / "cityscapes_selection_train")
    assert gen.returncode == 0, gen.stderr
    sel = tmp_path / "cityscapes_selection_train"
    meta = read_json(sel / METADATA_NAME)
    for out in (demo_copy / "leftImg8bit", demo_copy):
        res = cli(REPO / "generation/instance_generation.py", "--mode", "recolor", "--metadata", sel / METADATA_NAME,
                  "--folder", out)
        one_error(res, "the input", str(meta["dataset_root"]))
    assert tree_hash(demo_copy) == before
    with pytest.raises(InstSynthError, match="contains the input"):
        check_disjoint([demo_copy], demo_copy.parent)


def test_integration_refuses_an_output_overlapping_the_dataset(stage1):
    root = stage1["root"]
    before = tree_hash(root)
    for out in (root, root / "leftImg8bit" / "extra"):
        res = cli(REPO / "inpainted_integration.py", "--inpainting_dir", stage1["gen"], "--output_folder_name", out)
        one_error(res, "is inside the input")
    assert tree_hash(root) == before


def coco_images(files: dict) -> Path:
    return files["train"].parent.parent / "images/train"


def test_coco_stage1_refuses_an_output_in_its_images(coco_export, tmp_path):
    res = cli(REPO / "process_clean_ver.py", "--coco", coco_export["train"], "--images", coco_images(coco_export),
              "--out", coco_images(coco_export) / "sel")
    one_error(res, "is inside the input")


# --------------------------------------------------------------------------- 2. one writer per folder
def hold(folder: Path) -> subprocess.Popen:
    """A process holding ``folder``'s lock until killed."""
    proc = subprocess.Popen([PY, "-c", "import time; from instsynth.core.lock import output_lock\n"
                             f"with output_lock({str(folder)!r}):\n print('held', flush=True); time.sleep(120)"],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_gets_one_line_and_changes_nothing(stage1):
    mode_dir = stage1["gen"]
    holder = hold(mode_dir)
    try:
        before = tree_hash(mode_dir)
        for seed in ("1", "2"):
            res = cli(REPO / "generation/instance_generation.py", "--mode", "recolor", "--folder", stage1["sel"],
                      "--seed", seed)
            one_error(res, f"{mode_dir} is being written by another InstSynth run (pid {holder.pid})",
                      "wait for it or choose another output folder")
        assert tree_hash(mode_dir) == before
        res = cli(REPO / "process_clean_ver.py", "--train_folder", stage1["root"], "--out", stage1["sel"])
        assert res.returncode == 0, res.stderr  # another folder (the mode folder's parent): not blocked
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed holder's lock never blocks
        holder.wait()
    assert (mode_dir / ".instsynth-lock").exists()  # left by the killed run ...
    res = cli(REPO / "generation/instance_generation.py", "--mode", "recolor", "--folder", stage1["sel"])
    assert res.returncode == 0, res.stderr  # ... and not in the way
    assert not (mode_dir / ".instsynth-lock").exists()


def test_stage1_second_writer_is_refused(demo_copy, coco_export, tmp_path):
    sources = (["--train_folder", demo_copy], ["--coco", coco_export["train"], "--images", coco_images(coco_export)])
    for n, source in enumerate(sources):
        out = tmp_path / f"sel{n}"
        holder = hold(out)
        try:
            one_error(cli(REPO / "process_clean_ver.py", *source, "--out", out), "is being written by another")
            assert sorted(p.name for p in out.iterdir()) == [".instsynth-lock"]
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()


def test_second_stage5_and_copy_paste_are_refused(demo_copy, tmp_path):
    holder = hold(demo_copy)
    try:
        before = tree_hash(demo_copy)
        res = cli(REPO / "cityscapes-to-coco-conversion/main_defined_clean_ver.py", "--dataset", "cityscapes",
                  "--datadir", demo_copy)
        one_error(res, f"{demo_copy} is being written by another InstSynth run (pid {holder.pid})")
        assert tree_hash(demo_copy) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    holder = hold(tmp_path / "cp")
    try:
        res = cli("-m", "instsynth.copy_paste", "--dataset", demo_copy, "--out", tmp_path / "cp", "--num_images", "1")
        one_error(res, "is being written by another InstSynth run")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_second_integration_gets_one_line(stage1):
    out = stage1["tmp"] / "out"
    holder = hold(out)
    try:
        res = cli(REPO / "inpainted_integration.py", "--inpainting_dir", stage1["gen"], "--output_folder_name", out)
        one_error(res, f"{out} is being written by another InstSynth run (pid {holder.pid})")
        assert sorted(p.name for p in out.iterdir()) == [".instsynth-lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_quality_filter_and_reports_are_refused_while_their_folder_is_written(stage1, tmp_path):
    """The quality filter rewrites generation.json: it shares the run folder's lock with generation. Sheets,
    overlays and the summary's --write-before folder take the lock of the folder they write."""
    mode_dir = stage1["gen"]
    holder = hold(mode_dir)
    try:
        before = tree_hash(mode_dir)
        res = cli(REPO / "generation/filter_generation.py", "--manifest", mode_dir, "--clip", tmp_path / "no-model")
        one_error(res, f"{mode_dir} is being written by another InstSynth run (pid {holder.pid})")
        assert tree_hash(mode_dir) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    reports = {"sheets": ["visualization/visualize.py", "sheets", "--manifest", mode_dir / "generation.json", "--out"],
               "before": ["-m", "instsynth.summary", "run", "--work_dir", stage1["sel"], "--output", stage1["sel"],
                          "--write-before"]}
    for name, command in reports.items():
        out = tmp_path / name
        holder = hold(out)
        try:
            one_error(cli(*[REPO / c if c.endswith(".py") else c for c in command[:1]], *command[1:], out),
                      f"{out} is being written by another InstSynth run")
            assert sorted(p.name for p in out.iterdir()) == [".instsynth-lock"]
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
    res = cli(REPO / "visualization/visualize.py", "sheets", "--manifest", mode_dir / "generation.json", "--out",
              tmp_path / "sheets")
    assert res.returncode == 0 and not (tmp_path / "sheets" / ".instsynth-lock").exists(), res.stderr


def test_overlays_are_not_written_into_their_images(coco_export):
    images = coco_images(coco_export)
    before = tree_hash(images)
    res = cli(REPO / "visualization/visualize.py", "overlay", "--coco", coco_export["train"], "--image-root", images,
              "--out", images / "viz")
    one_error(res, "is inside the input")
    assert tree_hash(images) == before


def test_torchrun_generation_is_refused_by_rank_0_for_every_rank(stage1):
    """Several ranks share one run folder: rank 0 holds its lock for all of them, so a second run of any size
    is refused and changes nothing."""
    mode_dir = stage1["gen"]
    launcher = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    gen = [REPO / "generation/instance_generation.py", "--mode", "recolor", "--folder", stage1["sel"], "--device", "cpu"]
    holder = hold(mode_dir)
    try:
        before = tree_hash(mode_dir)
        res = subprocess.run([*launcher, *map(str, gen), "--seed", "2"], capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, PYTHONPATH=str(REPO), INSTSYNTH_NO_PROGRESS="1", OMP_NUM_THREADS="1"))
        assert res.returncode != 0
        errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
        assert errors == [f"error: {mode_dir} is being written by another InstSynth run (pid {holder.pid}); "
                          "wait for it or choose another output folder"], res.stderr[-3000:]
        assert str(REPO / "instsynth") not in res.stderr  # torchrun reports the failed rank, with no frame of ours
        assert tree_hash(mode_dir) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    res = subprocess.run([*launcher, *map(str, gen), "--num_samples", "2"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(REPO), INSTSYNTH_NO_PROGRESS="1", OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (mode_dir / ".instsynth-lock").exists()  # released once every rank finished
    manifest = read_json(mode_dir / "generation.json")
    assert all(len(e["samples"]) == 2 for e in manifest["instances"].values())


def test_lock_waits_when_asked(tmp_path):
    code = f"from instsynth.core.lock import output_lock\nwith output_lock({str(tmp_path)!r}): pass"
    with output_lock(tmp_path):
        res = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert res.returncode == 1 and "is being written by another InstSynth run" in res.stderr
        with output_lock(tmp_path):  # the holder itself may take it again
            pass
        waiter = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=dict(os.environ, PYTHONPATH=str(REPO), INSTSYNTH_LOCK_WAIT="1"))
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(timeout=3)  # waits while held ...
    assert waiter.wait(timeout=60) == 0  # ... and goes on once released


def test_machine_rank_outside_the_machines_is_refused():
    res = cli(REPO / "train_net.py", "--num-machines", "2", "--machine-rank", "2", "--dist-url", "tcp://127.0.0.1:1")
    one_error(res, "--machine-rank", "0 .. 1")


# --------------------------------------------------------------------------- 3. hostile sizes and JSON
def png_header(path: Path, width: int, height: int) -> None:
    """A small PNG whose header declares ``width`` x ``height`` (its data is a few bytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [32000, 60000])
def test_oversized_image_is_refused_from_its_header(demo_copy, tmp_path, side):
    gt = sorted((demo_copy / "gtFine/train").rglob("*_gtFine_instanceIds.png"))[0]
    png_header(gt, side, side)
    res = cli(REPO / "process_clean_ver.py", "--train_folder", demo_copy, "--out", tmp_path / "sel", "--workers", "1")
    one_error(res, str(gt), f"{side}x{side}", "exceeds the cap")
    res = cli(REPO / "process_clean_ver.py", "--train_folder", demo_copy, "--out", tmp_path / "sel", "--workers", "1",
              "--skip-bad")
    assert res.returncode == 0, res.stderr
    assert [b["path"] for b in read_json(tmp_path / "sel/selection_report.json")["bad_images"]] == [str(gt)]
    res = cli(REPO / "process_clean_ver.py", "--train_folder", demo_copy, "--out", tmp_path / "sel2", "--workers", "1",
              "--max-pixels", "1000")
    one_error(res, "exceeds the cap of 1000")


def test_deeply_nested_or_huge_json_is_one_line(stage1):
    meta = stage1["sel"] / METADATA_NAME
    meta.write_text("[" * 2_000_000)
    res = cli(REPO / "generation/instance_generation.py", "--mode", "recolor", "--metadata", meta)
    one_error(res, str(meta), "nested too deeply")
    meta.write_text("[" + "0," * 600_000 + "0]")
    res = cli(REPO / "generation/instance_generation.py", "--mode", "recolor", "--metadata", meta,
              env={"INSTSYNTH_MAX_JSON_MB": "1"})
    one_error(res, str(meta), "JSON file over 1 MB")


# --------------------------------------------------------------------------- 4. temporary files
def test_temporaries_have_the_project_prefix_and_only_they_are_removed(stage1):
    with atomic_path(stage1["tmp"] / "x.png") as tmp:
        assert tmp.name.startswith(".instsynth-tmp-x.png.")
    crops = next((stage1["sel"] / "crops/train").iterdir())
    leftover, draft = crops / ".instsynth-tmp-a.png.x1y2.png", crops / ".draft.tmp.png"
    mode_leftover, mode_draft = stage1["gen"] / "train" / ".instsynth-tmp-b.png.q.png", stage1["gen"] / ".draft.tmp.png"
    for p in (leftover, draft, mode_leftover, mode_draft):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    assert cli(REPO / "generation/instance_generation.py", "--mode", "recolor", "--folder", stage1["sel"]).returncode == 0
    assert not mode_leftover.exists() and leftover.exists()  # generation cleans its mode folder only
    select_instances(stage1["root"], out=stage1["sel"], workers=1)
    assert not leftover.exists()
    assert draft.read_bytes() == b"x" and mode_draft.read_bytes() == b"x"


def test_temp_cleanup_leaves_folders_of_another_running_stage(tmp_path):
    (tmp_path / "sub").mkdir()
    ours, theirs = tmp_path / ".instsynth-tmp-a.png.1.png", tmp_path / "sub" / ".instsynth-tmp-b.png.2.png"
    ours.write_bytes(b"x")
    theirs.write_bytes(b"x")
    (tmp_path / "sub" / ".instsynth-lock").write_text("1\n")
    assert remove_temp_files(tmp_path) == 1 and theirs.exists()


def test_coco_file_name_stays_inside_the_images_folder(coco_export, tmp_path):
    path = tmp_path / "instances.json"
    data = read_json(coco_export["train"])
    images = tmp_path / "images"
    os.symlink(coco_images(coco_export), images)  # a symlinked images folder is fine ...
    path.write_text(json.dumps(data))
    select_coco_instances(path, images, out=tmp_path / "ok", workers=1)
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep")
    for name in ("../victim.png", str(victim)):
        data["images"][0]["file_name"] = name
        path.write_text(json.dumps(data))
        res = cli(REPO / "process_clean_ver.py", "--coco", path, "--images", images, "--out", tmp_path / "sel")
        one_error(res, str(path), "must stay inside the images folder")
    res = cli(REPO / "process_clean_ver.py", "--coco", path, "--images", images, "--out", tmp_path / "sel", "--skip-bad")
    assert res.returncode == 0, res.stderr
    assert len(read_json(tmp_path / "sel/selection_report.json")["bad_image_entries"]) == 1
