"""Your own dataset: the COCO / LVIS path of stage 1, generation prompts, integration and training."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import DEMO_KW, REPO
from instsynth.formats.coco import annotation_mask
from instsynth.stages.selection import select_coco_instances
from instsynth.coco_output import merged_json_path
from instsynth.generation import GenerationSettings, generate_instances, load_manifest
from instsynth.integration import IntegrationParams, integrate_samples
from instsynth.core.io import InstSynthError, read_json, read_png
from instsynth.stages.label_crops import crop_resize_labels
from instsynth.core.labels import complete_prompt_bank, generated_prompts, load_prompt_bank
from instsynth.stages.selection import METADATA_NAME, load_metadata, select_instances

CROPS = 1


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_coco(tmp_path_factory) -> Path:
    """The demo dataset as COCO (``python -m instsynth.demo OUT --format coco``) with its Cityscapes tree."""
    out = tmp_path_factory.mktemp("demo_coco")
    kw = {**DEMO_KW, "size": "x".join(map(str, DEMO_KW["size"]))}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    subprocess.run([sys.executable, "-m", "instsynth.demo", str(out), "--format", "coco", *args], cwd=REPO,
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return out


@pytest.fixture(scope="module")
def both(demo_coco, tmp_path_factory):
    """Stage 1, recolor generation and integration on the same demo data, by the Cityscapes and the COCO path."""
    work = tmp_path_factory.mktemp("both")
    src_digest = digest(demo_coco / "annotations") | digest(demo_coco / "images")
    select_instances(demo_coco / "cityscapes", out=work / "cs", workers=1)
    select_coco_instances(demo_coco / "annotations/instances_train.json", demo_coco / "images/train",
                          out=work / "coco", workers=1)
    for name in ("cs", "coco"):
        generate_instances(work / name / METADATA_NAME, settings=GenerationSettings(mode="recolor"))
        integrate_samples(work / name / "Recolor", work / f"{name}_out", params=IntegrationParams(crops_per_sample=CROPS),
                          workers=1)
    return work, src_digest


def test_coco_path_selects_the_same_instances_and_crops(both):
    work, _ = both
    cs, coco = (read_json(work / n / METADATA_NAME)["instances"] for n in ("cs", "coco"))
    assert len(cs) == len(coco) == 15
    for a, b in zip(cs, coco):
        for field in ("image_id", "city", "label_id", "class", "area", "bbox", "crop_box"):
            assert a[field] == b[field], (field, a["key"], b["key"])
        for crop in ("crop_rgb", "crop_mask"):
            assert np.array_equal(read_png(work / "cs" / a[crop]), read_png(work / "coco" / b[crop])), (crop, b["key"])
    meta = load_metadata(work / "coco" / METADATA_NAME)  # validated, with absolute paths
    assert meta["format"] == "coco" and meta["instances"][0]["image_path"].is_file()


def test_synthetic_masks_match_the_cityscapes_path_pixel_for_pixel(both):
    """Every annotation of every new COCO image equals the Cityscapes instance it came from, cut the same way."""
    work, _ = both
    cs_meta, coco_meta = (read_json(work / n / METADATA_NAME) for n in ("cs", "coco"))
    cs_of = {b["key"]: a for a, b in zip(cs_meta["instances"], coco_meta["instances"])}
    source = read_json(coco_meta["coco_json"])
    anns_by_id = {a["id"]: a for a in source["annotations"]}
    entries = read_json(work / "coco_out" / "integration.json")["images"]
    assert len(entries) == 15 * (1 + CROPS)
    checked = 0
    for entry in entries:
        inst = cs_of[entry["key"]]
        ids = read_png(Path(cs_meta["dataset_root"]) / inst["instance_ids"])
        h, w = ids.shape
        box = entry["bbox_coordinate"]
        image = read_png(work / "coco_out" / "images" / entry["file_name"], rgb=True)
        assert image.shape[:2] == (h, w)
        for ann in entry["annotations"]:
            src = annotation_mask(anns_by_id[ann["source_annotation_id"]], h, w)
            if not ann["iscrowd"]:  # the Cityscapes instance this annotation was exported from
                values, counts = np.unique(ids[src], return_counts=True)
                assert len(values) == 1 and counts[0] == src.sum()
                src = ids == values[0]
                if ann["pasted"]:
                    assert values[0] == inst["instance_id"]
            want = crop_resize_labels(src.view(np.uint8), box, (w, h)).astype(bool)
            assert np.array_equal(annotation_mask(ann, h, w), want), (entry["file_name"], ann["source_annotation_id"])
            checked += 1
        assert sum(a["pasted"] for a in entry["annotations"]) == 1
    # the Cityscapes path's panoramas: the pasted instance's pixels agree with the COCO panorama's annotation
    cs_entries = {(e["key"], e["sample_index"]): e for e in read_json(work / "cs_out" / "integration.json")["images"]
                  if e["kind"] == "panorama"}
    for entry in (e for e in entries if e["kind"] == "panorama"):
        inst = cs_of[entry["key"]]
        cs_ids = read_png(work / "cs_out" / cs_entries[inst["key"], entry["sample_index"]]["outputs"]["instanceIds"])
        pasted = next(a for a in entry["annotations"] if a["pasted"])
        assert np.array_equal(annotation_mask(pasted, *cs_ids.shape), cs_ids == inst["instance_id"])
    assert checked > 100


def test_merged_file_keeps_originals_adds_exact_synthetic_annotations_and_evaluates_to_ap_1(both, demo_coco):
    work, src_digest = both
    out = work / "coco_out"
    source = read_json(demo_coco / "annotations/instances_train.json")
    merged = read_json(merged_json_path(out, "train"))
    n_img, n_ann = len(source["images"]), len(source["annotations"])
    assert [json.dumps(a) for a in merged["annotations"][:n_ann]] == [json.dumps(a) for a in source["annotations"]]
    assert [json.dumps(i) for i in merged["images"][:n_img]] == [json.dumps(i) for i in source["images"]]
    assert merged["categories"] == source["categories"]
    new_images, new_anns = merged["images"][n_img:], merged["annotations"][n_ann:]
    assert len(new_images) == 15 * (1 + CROPS) and len(new_anns) > 100
    assert min(i["id"] for i in new_images) > max(i["id"] for i in source["images"])
    assert min(a["id"] for a in new_anns) > max(a["id"] for a in source["annotations"])
    assert len({i["id"] for i in merged["images"]}) == len(merged["images"])
    assert len({a["id"] for a in merged["annotations"]}) == len(merged["annotations"])
    info = merged["info"]["instsynth"]
    assert info["source_json"] == str(demo_coco / "annotations/instances_train.json")
    assert info["generation_manifest"].endswith("Recolor/generation.json") and info["params"]["crops_per_sample"] == CROPS
    # the pasted pixels lie inside the pasted annotation's mask; all other pixels are the source's
    by_id = {i["id"]: i for i in merged["images"]}
    for img in new_images:
        if "_00.png" not in img["file_name"]:
            continue
        pasted = next(a for a in new_anns if a["image_id"] == img["id"] and a["pasted"])
        new = read_png(out / "images" / img["file_name"], rgb=True)
        old = read_png(out / "images" / by_id[img["source_image_id"]]["file_name"], rgb=True)
        changed = (new != old).any(axis=2)
        assert changed.any() and not (changed & ~annotation_mask(pasted, img["height"], img["width"])).any()
    kinds = {type(a["segmentation"]).__name__ for a in new_anns}
    assert kinds == {"list", "dict"}  # polygons where exact, RLE otherwise (holes, crowd regions)
    gt = COCO(str(merged_json_path(out, "train")))
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
                "segmentation": {**rle, "counts": getattr(rle["counts"], "decode", lambda: rle["counts"])()}}
               for a in merged["annotations"] if not a["iscrowd"] for rle in [gt.annToRLE(a)]]
    ev = COCOeval(gt, gt.loadRes(results), "segm")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
    # originals linked into OUT/images; the source never modified
    assert all((out / "images" / i["file_name"]).is_file() for i in merged["images"])
    assert digest(demo_coco / "annotations") | digest(demo_coco / "images") == src_digest


def test_coco_integration_rerun_writes_nothing(both):
    work, _ = both
    out = work / "coco_out"
    before = digest(out)
    summary = integrate_samples(work / "coco" / "Recolor", out, params=IntegrationParams(crops_per_sample=CROPS), workers=1)
    after = digest(out)
    assert after.pop("integration_report.json") != before.pop("integration_report.json")  # it counts the reuse
    assert summary.files_written == 0 and after == before
    assert read_json(out / "integration_report.json")["samples_reused"] == 15


# --------------------------------------------------------------------------- bad input
def bad_file(demo_coco: Path, tmp_path: Path, change) -> Path:
    data = read_json(demo_coco / "annotations/instances_train.json")
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


def _drop_image(d):
    d["images"][1]["file_name"] = "ashford/missing.png"


BAD = {
    "annotation to a missing image": (lambda d: d["annotations"][3].update(image_id=999), "annotation id 4", True),
    "polygon with 2 points": (lambda d: d["annotations"][5].update(segmentation=[[1, 1, 5, 5]]), "annotation id 6.*2 points", True),
    "box outside the image": (lambda d: d["annotations"][7].update(bbox=[500, 10, 40, 40]), "annotation id 8.*outside", True),
    "missing image file": (_drop_image, "image id 2.*not found", True),
    "duplicate annotation id": (lambda d: d["annotations"][2].update(id=1), "duplicate annotation id 1", False),
    "duplicate image id": (lambda d: d["images"][2].update(id=1), "duplicate image id 1", False),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_coco_input_is_a_clear_error_or_a_counted_skip(demo_coco, tmp_path, case):
    change, message, skippable = BAD[case]
    path = bad_file(demo_coco, tmp_path, change)
    before = path.read_bytes()
    images = demo_coco / "images/train"
    with pytest.raises(InstSynthError, match=message) as err:
        select_coco_instances(path, images, out=tmp_path / "sel", workers=1)
    assert str(path) in str(err.value)
    if skippable:
        summary = select_coco_instances(path, images, out=tmp_path / "sel", workers=1, skip_bad=True)
        report = read_json(summary.report)
        assert len(report["bad_annotations"]) + len(report["bad_image_entries"]) == 1
        assert summary.bad_images == 1
    assert path.read_bytes() == before


def test_skip_bad_leaves_bad_annotations_out_of_the_merged_file(demo_coco, tmp_path):
    path = bad_file(demo_coco, tmp_path, BAD["polygon with 2 points"][0])
    sel = select_coco_instances(path, demo_coco / "images/train", k=1, out=tmp_path / "sel", workers=1, skip_bad=True)
    gen = generate_instances(sel.metadata, settings=GenerationSettings(mode="recolor"))
    params = IntegrationParams(crops_per_sample=0)
    with pytest.raises(InstSynthError, match="annotation id 6.*2 points"):
        integrate_samples(gen.manifest.parent, tmp_path / "out", params=params, workers=1)
    integrate_samples(gen.manifest.parent, tmp_path / "out", params=params, workers=1, skip_bad=True)
    merged = read_json(merged_json_path(tmp_path / "out", "train"))
    source = read_json(path)
    assert [a["id"] for a in merged["annotations"][:len(source["annotations"]) - 1]] == \
        [a["id"] for a in source["annotations"] if a["id"] != 6]
    assert all(a.get("source_annotation_id") != 6 for a in merged["annotations"])
    report = read_json(tmp_path / "out" / "integration_report.json")
    assert [b["id"] for b in report["bad_source_items_left_out"]] == [6] and report["new_images"] == 5


def test_unknown_category_names_are_listed(demo_coco, tmp_path):
    with pytest.raises(InstSynthError, match=r"unknown category names \['spaceship'\].*'bus'"):
        select_coco_instances(demo_coco / "annotations/instances_train.json", demo_coco / "images/train",
                              classes=["car", "spaceship"], out=tmp_path, workers=1)
    cli = subprocess.run([sys.executable, "process_clean_ver.py", "--coco", str(demo_coco / "annotations/instances_train.json"),
                          "--images", str(demo_coco / "images/train"), "--classes", "spaceship", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True)
    assert cli.returncode != 0 and "spaceship" in cli.stderr and "instances_train.json" in cli.stderr


# --------------------------------------------------------------------------- LVIS, formats, prompts
@pytest.fixture(scope="module")
def lvis(demo_coco, tmp_path_factory) -> Path:
    """The demo train split as an LVIS-style file: names with underscores, synonyms, frequencies, uncompressed RLE."""
    data = read_json(demo_coco / "annotations/instances_train.json")
    freq = {"bus": "r", "truck": "r", "car": "f"}
    for cat in data["categories"]:
        cat.update(frequency=freq.get(cat["name"], "c"), synonyms=[cat["name"]])
        if cat["name"] == "bus":
            cat.update(name="school_bus", synonyms=["school_bus", "schoolbus"], **{"def": "a bus for pupils"})
    for img in data["images"]:
        img.update(not_exhaustive_category_ids=[24], neg_category_ids=[31])
    for ann in data["annotations"]:  # every RLE as uncompressed counts
        if isinstance(ann["segmentation"], dict):
            from pycocotools import mask as mask_utils
            m = mask_utils.decode({**ann["segmentation"], "counts": ann["segmentation"]["counts"].encode()})
            flat = m.ravel(order="F")
            edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
            counts = np.diff(np.r_[0, edges, flat.size]).tolist()
            ann["segmentation"] = {"size": list(m.shape), "counts": ([0] if flat[0] else []) + counts}
    data.pop("info")
    path = tmp_path_factory.mktemp("lvis") / "lvis_v1_train.json"
    path.write_text(json.dumps(data))
    return path


def test_lvis_rare_categories_and_generated_prompts(lvis, demo_coco, tmp_path, caplog):
    images = demo_coco / "images/train"
    summary = select_coco_instances(lvis, images, frequency=["r"], out=tmp_path / "sel", workers=1)
    meta = read_json(summary.metadata)
    assert {i["class"] for i in meta["instances"]} == {"school_bus", "truck"}
    # uncompressed RLE gives the same crops as the compressed RLE of the plain COCO file
    plain = select_coco_instances(demo_coco / "annotations/instances_train.json", images, classes=["bus", "truck"],
                                  out=tmp_path / "plain", workers=1)
    for a, b in zip(read_json(plain.metadata)["instances"], meta["instances"]):
        assert a["bbox"] == b["bbox"] and a["area"] == b["area"]
        assert np.array_equal(read_png(tmp_path / "plain" / a["crop_mask"]), read_png(tmp_path / "sel" / b["crop_mask"]))
    with pytest.raises(InstSynthError, match=r"no prompts for classes \['school_bus'\]"):
        generate_instances(summary.metadata, settings=GenerationSettings(mode="recolor"), strict_prompts=True)
    with caplog.at_level("INFO", logger="instsynth"):
        gen = generate_instances(summary.metadata, settings=GenerationSettings(mode="recolor"))
    said = [r.getMessage() for r in caplog.records if "generated 'a <colour> <class>' prompts" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith("has no prompts for 1 selected classes; generated 'a <colour> <class>' "
                                               "prompts for: school_bus"), said
    manifest = load_manifest(gen.manifest)
    texts = {e["class"]: e["text"] for e in manifest["instances"].values()}
    assert texts["school_bus"] in [f"a photo of {p}" for p in generated_prompts("school_bus", ["school_bus"])]
    assert texts["school_bus"].endswith(" school bus") and texts["truck"] in ("a photo of a red truck", "a photo of a green truck")
    from instsynth.quality.runs import SampleRef
    from instsynth.quality.gate import other_prompts  # the quality gate's margin sees the same prompts
    key, entry = next((k, e) for k, e in manifest["instances"].items() if e["class"] == "school_bus")
    ref = SampleRef(key, 0, Path(), "", Path(), Path(), "school_bus", entry["prompt"], entry["text"])
    assert len(other_prompts(manifest)(ref)) == len(generated_prompts("school_bus", ["school_bus"]))
    out = tmp_path / "out"
    integrate_samples(gen.manifest.parent, out, params=IntegrationParams(crops_per_sample=1), workers=1)
    merged = read_json(merged_json_path(out, "train"))
    new = [i for i in merged["images"] if "source_image_id" in i]
    assert new and all(i["not_exhaustive_category_ids"] == [24] and i["neg_category_ids"] == [31] for i in new)
    assert with_synonyms(merged)


def with_synonyms(merged: dict) -> bool:
    return any(c.get("synonyms") == ["school_bus", "schoolbus"] for c in merged["categories"])


def test_prompt_bank_completion():
    _, bank = load_prompt_bank()
    assert generated_prompts("bow_(weapon)")[:2] == ["a red bow", "a white bow"]
    full = complete_prompt_bank(bank, [{"name": "car"}, {"name": "aerosol_can", "synonyms": ["aerosol_can", "spray_can"]}])
    assert full["car"] == bank["car"] and full["aerosol_can"][0] == "a red aerosol can"
    with pytest.raises(InstSynthError, match=r"\['aerosol_can', 'zebra'\]"):
        complete_prompt_bank(bank, [{"name": "zebra"}, {"name": "aerosol_can"}], strict=True)


# --------------------------------------------------------------------------- end to end, training by name
def test_wrapper_runs_the_coco_dataset_to_coco_ap(both, demo_coco, tmp_path):
    """``run_instsynth.sh --coco``: same merged file as the library calls (2 workers), a catalog, COCO AP."""
    work, _ = both
    ann = demo_coco / "annotations"
    env = {**os.environ, "PYTHON": sys.executable, "OUTPUT_DATASET_PATH": str(tmp_path / "out"),
           "WORK_DIR": str(tmp_path / "work"), "CROPS_PER_SAMPLE": str(CROPS), "OMP_NUM_THREADS": "1",
           "TRAIN_CONFIG": "configs/quick_schedules/fastinst_R50_quick.yaml",
           "TRAIN_OPTS": f"SOLVER.MAX_ITER 2 SOLVER.CHECKPOINT_PERIOD 100 OUTPUT_DIR {tmp_path / 'run'}"}
    proc = subprocess.run(["bash", "scripts/run_instsynth.sh", "--coco", str(ann / "instances_train.json"),
                           "--images", str(demo_coco / "images/train"), "--val-coco", str(ann / "instances_val.json"),
                           "--val-images", str(demo_coco / "images/val")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    mine, theirs = merged_json_path(tmp_path / "out", "train"), merged_json_path(work / "coco_out", "train")
    instances = [sum(not a["iscrowd"] for a in read_json(f)["annotations"]) for f in (ann / "instances_train.json", mine)]
    assert f"COCO train: images 6 -> 36, instances {instances[0]} -> {instances[1]}" in proc.stdout  # the summary
    summary = read_json(tmp_path / "work" / "summary.json")
    assert summary["coco"]["train"]["after"]["per_class"]["car"] > 23
    classes = summary["classes"]  # every category of the file (the demo's selects 4 of them), before and after
    names = {c["name"] for c in read_json(ann / "instances_train.json")["categories"]}
    assert set(classes) == names and classes["rider"]["selected"] == 0
    assert classes["car"]["instances"] == 23 and classes["car"]["after"] == summary["coco"]["train"]["after"]["per_class"]["car"]
    rider = next(line.split() for line in proc.stdout.splitlines() if line.strip().startswith("rider"))
    assert rider[:2] == ["rider", str(classes["rider"]["instances"])] and rider[-1] == str(classes["rider"]["after"])
    strip = lambda d: {k: v for k, v in d.items() if k != "info"}  # noqa: E731 (info names this run's paths)
    assert strip(read_json(mine)) == strip(read_json(theirs))
    assert digest(tmp_path / "out" / "images" / "instsynth_syn") == digest(work / "coco_out" / "images" / "instsynth_syn")
    catalog = read_json_yaml(tmp_path / "out" / "catalog.yaml")
    assert set(catalog) == {"mydata_train", "mydata_train_instsynth", "mydata_val"}
    metrics = json.loads((tmp_path / "run" / "inference" / "metrics.json").read_text())
    assert set(metrics) == {"segm"} and 0 <= metrics["segm"]["AP"] <= 100 and "AP-caravan" in metrics["segm"]
    assert "mydata_train_instsynth" in (tmp_path / "run" / "config.yaml").read_text()


def read_json_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_catalog_errors_name_the_file(tmp_path, monkeypatch):
    from instsynth.data.catalog import get_spec, registered_names

    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("mine: {json_file: ann.json}\n")
    monkeypatch.setenv("INSTSYNTH_CATALOG", str(catalog))
    with pytest.raises(InstSynthError, match="catalog.yaml.*'mine'.*image_root"):
        get_spec("mine")
    catalog.write_text("mine: {json_file: ann.json, image_root: imgs}\n")
    assert "mine" in registered_names()
    with pytest.raises(InstSynthError, match="ann.json.*'mine' not found"):
        get_spec("mine")
