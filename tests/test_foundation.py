"""The installed stack works, the label helpers and the atomic I/O behave as the stages rely on."""
import json
import os

import numpy as np
import pytest

from instsynth.core import labels
from instsynth.core.io import (InstSynthError, atomic_path, image_id_of, read_json, read_png, split_image_id,
                               write_json, write_png)


def test_stack_imports_and_torchvision_nms_runs():
    import diffusers  # noqa: F401
    import torch
    import torchvision
    import transformers  # noqa: F401

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    assert keep.tolist() == [0, 2]


def test_thing_classes_come_from_cityscapesscripts():
    assert labels.THING_CLASSES == ("person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
                                    "motorcycle", "bicycle")
    assert set(labels.THING_CLASSES) - set(labels.EVAL_THING_CLASSES) == {"caravan", "trailer"}
    assert labels.label_id("car") == 26 and labels.class_name(33) == "bicycle"
    with pytest.raises(KeyError, match="unknown Cityscapes class"):
        labels.label_id("spaceship")


def test_instance_id_encoding():
    assert labels.encode_instance_id(26, 3) == 26003
    assert labels.decode_instance_id(26003) == (26, 3)
    assert labels.decode_instance_id(24) == (24, None)
    assert labels.is_group_region(24) and not labels.is_group_region(7) and not labels.is_group_region(24000)
    inst = np.array([[0, 7, 24, 24000], [26001, 33, 11, 26999]], np.uint16)
    assert labels.instance_ids_to_label_ids(inst).tolist() == [[0, 7, 24, 24], [26, 33, 11, 26]]
    assert labels.colorize(np.array([[26]]))[0, 0].tolist() == [0, 0, 142]


def test_prompt_bank_matches_the_paper():
    template, bank = labels.load_prompt_bank()
    assert template == "a photo of {}"
    assert set(bank) == set(labels.THING_CLASSES)
    assert all(len(v) == 2 for v in bank.values())
    assert bank["car"] == ["a red car", "a white car"] and bank["person"] == ["a woman", "a man"]
    assert labels.render_prompt(template, bank["bus"][1]) == "a photo of a green bus"


def test_prompt_bank_errors_name_the_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("template: 'no placeholder'\nprompts: {car: [a car]}\n")
    with pytest.raises(InstSynthError, match="p.yaml.*template"):
        labels.load_prompt_bank(bad)
    bad.write_text("template: 'a photo of {}'\nprompts: {spaceship: [a ship]}\n")
    with pytest.raises(InstSynthError, match="unknown class names"):
        labels.load_prompt_bank(bad)


def test_png_round_trip_keeps_16_bit_and_rgb(tmp_path):
    inst = np.array([[26000, 33001], [0, 7]], np.uint16)
    rgb = np.random.default_rng(0).integers(0, 255, (4, 5, 3), dtype=np.uint8)
    assert np.array_equal(read_png(write_png(tmp_path / "i.png", inst), dtype=np.uint16), inst)
    assert np.array_equal(read_png(write_png(tmp_path / "c.png", rgb), rgb=True), rgb)
    assert np.array_equal(read_png(tmp_path / "c.png", rgb=True, bgr=True), rgb[..., ::-1])
    with pytest.raises(InstSynthError, match="expected uint8"):
        read_png(tmp_path / "i.png", dtype=np.uint8)
    with pytest.raises(InstSynthError, match="expected size"):
        read_png(tmp_path / "c.png", shape=(5, 5))


def test_corrupt_and_missing_files_are_named(tmp_path):
    good = write_png(tmp_path / "a.png", np.zeros((64, 64), np.uint8)).read_bytes()
    (tmp_path / "trunc.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(InstSynthError, match="trunc.png: cannot decode"):
        read_png(tmp_path / "trunc.png")
    with pytest.raises(InstSynthError, match="missing.png: file not found"):
        read_png(tmp_path / "missing.png")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(InstSynthError, match="bad.json: not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["out.json"]


def test_cityscapes_names():
    assert image_id_of("x/aachen_000000_000019_gtFine_instanceIds.png") == "aachen_000000_000019"
    assert split_image_id("new_york_000001_000019") == ("new_york", "000001", "000019")
    with pytest.raises(InstSynthError):
        image_id_of("photo.png")


def test_identical_rewrite_keeps_the_file(tmp_path):
    target = write_json(tmp_path / "a.json", {"a": 1})
    before = target.stat().st_mtime_ns
    write_json(target, {"a": 1})
    assert target.stat().st_mtime_ns == before
    write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}


def test_errors_pickle_and_files_get_normal_permissions(tmp_path):
    import pickle

    err = pickle.loads(pickle.dumps(InstSynthError(tmp_path / "x.png", "broken")))
    assert isinstance(err, InstSynthError) and str(err) == f"{tmp_path / 'x.png'}: broken"
    mode = write_json(tmp_path / "p.json", {}).stat().st_mode & 0o777
    assert mode == 0o666 & ~_current_umask()


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _square_or_fail(x):
    if x == 7:
        raise InstSynthError("task7.png", "bad task")
    return x * x


def test_ordered_map_keeps_order_for_any_worker_count():
    from instsynth.core.parallel import ordered_map

    tasks = [5, 3, 9, 1, 4, 8]
    assert list(ordered_map(_square_or_fail, tasks, 1)) == list(ordered_map(_square_or_fail, tasks, 2)) \
        == [x * x for x in tasks]
    with pytest.raises(InstSynthError, match="task7.png: bad task"):
        list(ordered_map(_square_or_fail, [1, 7, 2], 2))
