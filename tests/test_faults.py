"""Environment faults and hand-edited manifests get clear errors.

A full disk or a read-only output folder stops every stage with one line naming the file (exit code 1,
no traceback, no temporary file left), also under --skip-bad, and a rerun after fixing it completes
with the same outputs (small tmpfs mounts; skipped where mounting is not allowed). A metadata.json
whose class, label_id, key or files disagree with the instance stops generation and integration."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from instsynth.stages.coco_conversion import convert_cityscapes_to_coco
from instsynth.generation import GenerationSettings, generate_instances
from instsynth.stages.integration import integrate_samples
from instsynth.core.io import (InstSynthError, OutputError, atomic_path, output_error, read_json, write_bytes,
                               write_json)
from instsynth.stages.label_crops import drop_color_and_label_ids
from instsynth.stages.selection import select_instances

from conftest import REPO


class Tmpfs:
    """A tmpfs mounted at ``path`` that a test can fill up, free again, or make read-only."""

    def __init__(self, path: Path, size: str):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({(res.stderr.strip() or 'not permitted').splitlines()[0]})")
        self.filler = path / "filler.bin"

    def fill(self, leave_bytes: int) -> None:
        """Occupy all but ``leave_bytes`` of the free space."""
        free = os.statvfs(self.path).f_bavail * os.statvfs(self.path).f_frsize
        with open(self.filler, "ab") as f:
            f.write(b"\0" * max(0, free - leave_bytes))

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def remount(self, option: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{option}", str(self.path)], check=True, capture_output=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path):
    fs = Tmpfs(tmp_path / "fs", "24m")
    yield fs
    fs.unmount()


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*.tmp*") if p.is_file()]


def pngs(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.png")}


# --------------------------------------------------------------------------- the stages, run into a folder
def stage1(demo_root, work: Path, skip_bad=True):
    return select_instances(demo_root, k=2, out=work / "sel", workers=2, skip_bad=skip_bad)


def generation(demo_root, work: Path, skip_bad=True):
    return generate_instances(work / "sel" / "metadata.json", out=work / "gen",
                              settings=GenerationSettings(num_samples=2), skip_bad=skip_bad)


def stage2(demo_root, work: Path, skip_bad=True):
    return integrate_samples(work / "gen" / "Recolor", work / "out", workers=2, skip_bad=skip_bad)


def stage4(demo_root, work: Path, skip_bad=True):
    return drop_color_and_label_ids(work / "out" / "cropped_region_coordinates.json", workers=2, skip_bad=skip_bad)


def stage5(demo_root, work: Path, skip_bad=True):
    return convert_cityscapes_to_coco(work / "out", splits=("train",), workers=2, skip_bad=skip_bad)


STAGES = [stage1, generation, stage2, stage4, stage5]
OUTPUT_OF = {stage1: "sel", generation: "gen", stage2: "out", stage4: "out", stage5: "out"}


@pytest.fixture(scope="module")
def reference(demo_root, tmp_path_factory) -> tuple[Path, dict]:
    """Every stage run once on an ordinary disk: the folder, and the PNGs of its output after each stage."""
    work = tmp_path_factory.mktemp("reference")
    after = {}
    for stage in STAGES:
        stage(demo_root, work)
        after[stage] = pngs(work / OUTPUT_OF[stage])
    return work, after


def run_up_to(stage, demo_root, reference: tuple[Path, dict], work: Path) -> None:
    """Give ``work`` what ``stage`` reads: the reference inputs, or the earlier stages run there."""
    reference = reference[0]
    for earlier in STAGES[:STAGES.index(stage)]:
        if OUTPUT_OF[earlier] == OUTPUT_OF[stage]:
            earlier(demo_root, work)
        elif not (work / OUTPUT_OF[earlier]).exists():
            os.symlink(reference / OUTPUT_OF[earlier], work / OUTPUT_OF[earlier])


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.__name__)
def test_full_disk_stops_the_stage_and_a_rerun_completes(stage, demo_root, reference, tmpfs):
    run_up_to(stage, demo_root, reference, tmpfs.path)
    before = set(pngs(tmpfs.path / OUTPUT_OF[stage]))
    tmpfs.fill(leave_bytes=48 * 1024)
    with pytest.raises(OutputError, match=r"no space left on device \(\d+\.\d MB free; rerun after freeing "
                                          r"space: finished files are kept\)") as err:
        stage(demo_root, tmpfs.path, skip_bad=True)  # a full disk is never "bad input" to skip
    assert err.value.path.is_relative_to(tmpfs.path)
    assert temp_files(tmpfs.path) == []
    kept = set(pngs(tmpfs.path / OUTPUT_OF[stage])) - before
    tmpfs.free()
    stage(demo_root, tmpfs.path, skip_bad=False)
    got = pngs(tmpfs.path / OUTPUT_OF[stage])
    assert got == reference[1][stage]
    assert kept <= set(got)


@pytest.mark.parametrize("stage", [stage1, generation, stage2, stage5], ids=lambda s: s.__name__)
def test_read_only_output_folder(stage, demo_root, reference, tmpfs):
    run_up_to(stage, demo_root, reference, tmpfs.path)
    tmpfs.remount("ro")
    with pytest.raises(OutputError, match=f"{tmpfs.path}.* is read-only .*then rerun: finished files are kept"):
        stage(demo_root, tmpfs.path, skip_bad=True)
    tmpfs.remount("rw")


def test_refused_writes_name_the_file_and_the_folder(tmp_path):
    target = tmp_path / "a" / "b.json"
    denied = output_error(target, PermissionError(13, "Permission denied", str(tmp_path / "a")))
    assert isinstance(denied, OutputError) and denied.errno == 13
    assert str(denied).startswith(f"{target}: permission denied: {tmp_path} is not writable")
    other = PermissionError(13, "Permission denied", str(tmp_path / "elsewhere" / "source.png"))
    assert output_error(target, other) is other  # a source that cannot be read is not a refused write
    assert output_error(target, FileNotFoundError(2, "No such file")).errno == 2
    import pickle

    assert str(pickle.loads(pickle.dumps(denied))) == str(denied)  # crosses worker-process boundaries


def test_failed_write_removes_its_temporary_file(tmp_path):
    with pytest.raises(OutputError, match="no space left"):
        with atomic_path(tmp_path / "x.png") as tmp:
            tmp.write_bytes(b"half")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    write_bytes(tmp_path / "x.png", b"whole")
    assert (tmp_path / "x.png").read_bytes() == b"whole"


def _cli(args, env_extra=None, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO), INSTSYNTH_NO_PROGRESS="1", **(env_extra or {}))
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, **kw)


def test_cli_prints_one_line_without_traceback_and_exit_code_1(demo_root, tmp_path):
    fs = Tmpfs(tmp_path / "fs", "32k")
    try:
        cmd = [sys.executable, str(REPO / "process_clean_ver.py"), "--train_folder", str(demo_root),
               "--out", str(fs.path / "sel"), "--workers", "2"]
        res = _cli(cmd)
        assert res.returncode == 1, res.stderr
        assert "Traceback" not in res.stderr
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {fs.path}/sel/") and "no space left on device" in last, res.stderr
        assert temp_files(fs.path) == []
        debug = _cli(cmd, {"INSTSYNTH_DEBUG": "1"})
        assert debug.returncode == 1 and "Traceback" in debug.stderr and "OutputError" in debug.stderr
    finally:
        fs.unmount()


def test_wrapper_stops_at_the_failing_stage_with_its_error(tmp_path):
    fs = Tmpfs(tmp_path / "fs", "32k")
    try:
        from instsynth.stages.demo_dataset import write_demo_dataset

        write_demo_dataset(tmp_path / "cityscapes", cities=1, images_per_city=2, size=(256, 128))
        env = dict(PYTHON=sys.executable, DATASET_PATH=str(tmp_path / "cityscapes"),
                   OUTPUT_DATASET_PATH=str(tmp_path / "out"), WORK_DIR=str(fs.path / "work"))
        fs.fill(leave_bytes=8 * 1024)
        res = _cli(["bash", str(REPO / "scripts" / "run_instsynth.sh")], env)
        assert res.returncode == 1, res.stderr
        assert "Traceback" not in res.stderr
        assert "no space left on device" in res.stderr and "stage 1/7 instance selection failed" in res.stderr
    finally:
        fs.unmount()


# --------------------------------------------------------------------------- hand-edited metadata.json
def edited_metadata(reference, tmp_path, edit) -> Path:
    """A copy of the reference metadata.json (crops by absolute path) with instance 0 edited."""
    work = reference[0]
    meta = read_json(work / "sel" / "metadata.json")
    for inst in meta["instances"]:
        inst.update(crop_rgb=str(work / "sel" / inst["crop_rgb"]), crop_mask=str(work / "sel" / inst["crop_mask"]))
    edit(meta["instances"][0])
    return write_json(tmp_path / "metadata.json", meta)


def other_class(inst):
    return "person" if inst["class"] != "person" else "car"


EDITS = {
    "class": (lambda i: i.update({"class": other_class(i)}), r"class '\w+' disagrees with instance_id \d+"),
    "label_id": (lambda i: i.update(label_id=24 if i["label_id"] != 24 else 26), "label_id 2[46] disagrees"),
    "key": (lambda i: i.update(key=i["key"][:-1] + "9"), "key '.*9' disagrees .*expected '.*'"),
    "image": (lambda i: i.update(image=i["image"].replace(i["image_id"], i["image_id"][:-2] + "99")), "image .* is not a file of image_id"),
    "instance_id": (lambda i: i.update(instance_id=7001), "instance_id 7001 is not a thing instance"),
}


@pytest.mark.parametrize("field", EDITS)
def test_generation_and_integration_refuse_inconsistent_instances(field, reference, tmp_path):
    edit, message = EDITS[field]
    meta = edited_metadata(reference, tmp_path, edit)
    key = read_json(reference[0] / "sel" / "metadata.json")["instances"][0]["key"]
    named = rf"metadata.json: instances\[0\] \('{key[:-1]}.'\): {message}"
    with pytest.raises(InstSynthError, match=named):
        generate_instances(meta, out=tmp_path / "gen", skip_bad=True)
    with pytest.raises(InstSynthError, match=named):
        integrate_samples(reference[0] / "gen" / "Recolor", tmp_path / "out", metadata_path=meta, skip_bad=True)


def test_an_area_the_label_map_disagrees_with_stops_both_stages(reference, tmp_path):
    meta = edited_metadata(reference, tmp_path, lambda i: i.update(area=i["area"] + 1))
    key = read_json(meta)["instances"][0]["key"]
    with pytest.raises(InstSynthError, match=rf"_mask.png: instance '{key}': \d+ mask pixels but metadata.json says area"):
        generate_instances(meta, out=tmp_path / "gen")
    with pytest.raises(InstSynthError, match=rf"instanceIds.png: instance '{key}': \d+ pixels of id \d+, but "
                                             r"metadata.json says area"):
        integrate_samples(reference[0] / "gen" / "Recolor", tmp_path / "out", metadata_path=meta, workers=1)


def test_permission_denied_output_folder(demo_root, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        try:
            (locked / "probe").touch()
            pytest.skip("this user may write into a read-only folder (root)")
        except PermissionError:
            pass
        with pytest.raises(OutputError, match=f"permission denied: {locked} is not writable by this user"):
            stage1(demo_root, locked)
    finally:
        locked.chmod(0o755)


def test_debug_shows_the_traceback_of_bad_input_too(tmp_path):
    cmd = [sys.executable, str(REPO / "process_clean_ver.py"), "--train_folder", str(tmp_path / "nowhere")]
    plain, debug = _cli(cmd), _cli(cmd, {"INSTSYNTH_DEBUG": "1"})
    assert plain.returncode == 1 and plain.stderr.strip() == f"error: {tmp_path / 'nowhere'}/gtFine/train: " \
        "folder not found (expected a Cityscapes tree: gtFine/<split>/<city>/)"
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "InstSynthError" in debug.stderr


def test_checkpoint_on_a_full_disk(tmpfs):
    import torch

    from instsynth.engine.checkpoint import save_checkpoint

    model = torch.nn.Linear(256, 256)
    tmpfs.fill(leave_bytes=64 * 1024)  # a 256 kB checkpoint does not fit
    with pytest.raises(OutputError, match=r"model_final.pth: no space left on device \(0.\d MB free"):
        save_checkpoint(tmpfs.path / "train", "model_final.pth", model)
    assert temp_files(tmpfs.path) == []
    tmpfs.free()
    assert save_checkpoint(tmpfs.path / "train", "model_final.pth", model).is_file()
