"""Per-class budgets: rare classes get more instances per image (stage 1) and more samples (generation)."""
import pytest

from instsynth.stages.budget import balance_factors, class_budget, parse_class_values
from instsynth.core.io import InstSynthError, read_json


def test_inverse_frequency_factors_and_budgets():
    counts = {"car": 100, "truck": 4, "bus": 1, "train": 0}
    assert balance_factors(counts) == {"car": 1.0, "truck": 5.0, "bus": 8.0, "train": 8.0}  # sqrt, capped at 8
    assert balance_factors(counts, power=1.0, max_factor=50) == {"car": 1.0, "truck": 25.0, "bus": 50.0, "train": 50.0}
    budget = class_budget(3, "bus=2", "inverse_freq", counts)
    assert budget["per_class"] == {"car": 3, "truck": 15, "bus": 2, "train": 24}  # explicit values win
    assert class_budget(1, None, "none") is None
    assert class_budget(1, "truck=4", "none")["per_class"] == {"truck": 4}
    for bad in ("lorry=2", "truck=0", "truck", "truck=x"):
        with pytest.raises(ValueError):
            parse_class_values(bad)


@pytest.fixture(scope="module")
def selections(demo_root, tmp_path_factory):
    """Stage 1 with k=1, without and with the inverse-frequency budget, laid out as a run's work folder."""
    from instsynth.stages.selection import load_metadata, select_instances

    out = tmp_path_factory.mktemp("budget")
    plain = select_instances(demo_root, "train", k=1, out=out / "plain" / "selection", workers=1)
    balanced = select_instances(demo_root, "train", k=1, out=out / "balanced" / "selection", workers=1,
                                balance="inverse_freq")
    return out, load_metadata(plain.metadata), load_metadata(balanced.metadata), read_json(balanced.report)


def test_balanced_stage1_selects_more_instances_of_rare_classes(selections):
    _, plain, balanced, report = selections
    counts = balanced["class_counts"]
    assert counts == report["instances_per_class"] and counts["car"] > counts["truck"] > 0
    per_class = balanced["class_budget"]["per_class"]
    assert per_class["car"] == 1 and per_class["truck"] > 1 and per_class["bus"] > 1
    keys = lambda meta, cls=None: {i["key"] for i in meta["instances"] if cls in (None, i["class"])}  # noqa: E731
    assert keys(plain) <= keys(balanced)  # the k largest are always kept
    assert keys(plain, "car") == keys(balanced, "car")  # the most frequent class is unchanged
    gained = {c for c in ("truck", "bus") if len(keys(balanced, c)) > len(keys(plain, c))}
    assert gained, report["selected_per_class"]
    for image_id in {i["image_id"] for i in balanced["instances"]}:  # one of the k_c largest of its image
        chosen = [i for i in balanced["instances"] if i["image_id"] == image_id]
        assert sum(1 for i in chosen if per_class[i["class"]] == 1) <= 1
    assert report["params"]["k_per_class"]["truck"] == per_class["truck"]


def test_generation_budget_gives_rare_classes_more_samples_and_summary_shows_it(selections):
    from instsynth.generation.common import GenerationSettings
    from instsynth.generation.runner import generate_instances
    from instsynth.reports.summary import format_summary, run_summary

    out, _, balanced, _ = selections
    work = out / "balanced"
    settings = GenerationSettings(num_samples=1, balance="inverse_freq", samples_per_class="person=2")
    summary = generate_instances(work / "selection" / "metadata.json", work / "generation", settings)
    manifest = read_json(summary.manifest)
    budget = manifest["params"]["budget"]["per_class"]
    assert budget["person"] == 2 and budget["car"] == 1 and budget["truck"] > 1
    for entry in manifest["instances"].values():
        assert len(entry["samples"]) == budget[entry["class"]]
    assert read_json(summary.report)["samples_per_class"] == budget

    table = run_summary(work, out / "no-output")["classes"]
    assert table["truck"]["samples"] == table["truck"]["selected"] * budget["truck"] > 0
    assert table["truck"]["k"] == balanced["class_budget"]["per_class"]["truck"]
    text = format_summary({"stages": {}, "coco": {}, "output": "-", "work_dir": str(work), "classes": table})
    truck = next(line.split() for line in text.splitlines() if line.strip().startswith("truck"))
    assert truck == ["truck", str(table["truck"]["instances"]), str(table["truck"]["k"]),
                     str(table["truck"]["selected"]), str(budget["truck"]), str(table["truck"]["samples"]), "-"]
    assert table["truck"]["instances"] == balanced["class_counts"]["truck"]  # no output dataset: stage 1's totals


def test_bad_budgets_name_the_input(demo_root, tmp_path):
    from instsynth.generation.common import GenerationSettings
    from instsynth.generation.runner import generate_instances
    from instsynth.stages.selection import select_instances

    with pytest.raises(InstSynthError, match="unknown thing class 'lorry'"):
        select_instances(demo_root, "train", k=1, out=tmp_path, workers=1, k_per_class="lorry=3")
    meta = select_instances(demo_root, "train", k=1, out=tmp_path, workers=1).metadata
    with pytest.raises(InstSynthError, match="metadata.json.*truck=0"):
        generate_instances(meta, tmp_path / "gen", GenerationSettings(samples_per_class="truck=0"))


def _script(path):
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location(path.replace("/", "_")[:-3], REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_budget_flags_of_stage1_and_generation_clis(demo_root, tmp_path):
    _script("process_clean_ver.py").main(["--train_folder", str(demo_root), "--k", "1", "--k_per_class", "truck=3",
                                          "--out", str(tmp_path / "sel"), "--workers", "1"])
    meta = read_json(tmp_path / "sel" / "metadata.json")
    assert meta["class_budget"]["per_class"] == {"truck": 3} and meta["class_budget"]["balance"] == "none"
    _script("generation/instance_generation.py").main([
        "--metadata", str(tmp_path / "sel" / "metadata.json"), "--folder", str(tmp_path / "gen"),
        "--samples_per_class", "truck=2", "--balance", "inverse_freq", "--max_factor", "1"])
    manifest = read_json(tmp_path / "gen" / "Recolor" / "generation.json")
    assert {e["class"]: len(e["samples"]) for e in manifest["instances"].values()}["truck"] == 2
    assert set(manifest["params"]["budget"]["factors"].values()) == {1.0}  # max_factor 1: no balancing


def test_rank_instances_keeps_an_instance_among_the_k_c_largest_of_its_image():
    import numpy as np

    from instsynth.core.labels import label_id
    from instsynth.stages.selection import SelectionParams, rank_instances

    car, truck = label_id("car"), label_id("truck")
    ids = np.zeros((20, 20), np.uint16)
    areas = {car * 1000: 60, car * 1000 + 1: 50, car * 1000 + 2: 40, truck * 1000: 30, truck * 1000 + 1: 20}
    flat = ids.ravel()
    start = 0
    for value, area in areas.items():
        flat[start:start + area] = value
        start += area
    plain = SelectionParams(k=2, min_area=1)
    assert [v for v, _ in rank_instances(ids, plain)[0]] == [26000, 26001]
    budget = SelectionParams(k=2, min_area=1, k_per_class=((car, 1), (truck, 5)))
    chosen, skipped = rank_instances(ids, budget)
    assert [v for v, _ in chosen] == [26000, 27000, 27001] and skipped["beyond_k"] == 2


# --------------------------------------------------------------------------- budgets from a baseline's AP
def _metrics(path, segm=None, cityscapes=None):
    import json

    data = {k: v for k, v in (("segm", segm), ("cityscapes", cityscapes)) if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_ap_factors_favour_the_classes_a_baseline_gets_wrong(tmp_path):
    from instsynth.stages.budget import ap_factors, read_class_ap

    assert ap_factors({"car": 40.0, "truck": 10.0, "train": 2.5}, power=0.5) == {"car": 1.0, "truck": 2.0, "train": 4.0}
    assert ap_factors({"car": 40.0, "bus": 0.0, "train": None}) == {"car": 1.0, "bus": 8.0}  # no AP: left out
    assert ap_factors({"car": 0.0, "bus": 0.0}) == {"car": 1.0, "bus": 1.0}  # nothing learnt: no ranking
    assert ap_factors({"car": 40.0, "truck": 10.0}, power=1.0, max_factor=3) == {"car": 1.0, "truck": 3.0}
    run = tmp_path / "run"
    path = _metrics(run / "inference" / "metrics.json", segm={"AP": 20.0, "AP-car": 40.0, "AP-truck": 10.0},
                    cityscapes={"AP": 5.0, "AP-car": 1.0})
    assert read_class_ap(run) == read_class_ap(path) == {"car": 40.0, "truck": 10.0}  # segm first, folder accepted
    assert read_class_ap(_metrics(tmp_path / "cs.json", cityscapes={"AP-car": 9.0, "AP-bus": None})) == \
        {"car": 9.0, "bus": None}
    budget = class_budget(2, "truck=3", "ap", baseline_metrics=path)
    assert budget["per_class"] == {"car": 2, "truck": 3} and budget["baseline_ap"]["truck"] == 10.0
    assert class_budget(2, None, "ap", baseline_metrics=path)["per_class"] == {"car": 2, "truck": 4}


@pytest.mark.parametrize("content, problem", [
    ('{"segm": {"AP": 3}}', "no per-class AP"), ('{"segm": {"AP-car": 130}}', r"AP-car must be a number in \[0, 100\]"),
    ('[1, 2]', "JSON object"), ('{"segm": {"AP-car": "x"}}', "AP-car must be")])
def test_bad_baseline_metrics_name_the_file(tmp_path, content, problem):
    path = tmp_path / "metrics.json"
    path.write_text(content)
    with pytest.raises(InstSynthError, match=f"metrics.json.*{problem}"):
        class_budget(1, None, "ap", baseline_metrics=path)
    with pytest.raises(InstSynthError, match="baseline metrics not found"):
        class_budget(1, None, "ap", baseline_metrics=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs --baseline_metrics"):
        class_budget(1, None, "ap")
    with pytest.raises(ValueError, match="--balance ap only"):
        class_budget(1, None, "inverse_freq", {"car": 1}, baseline_metrics=path)


def test_ap_budget_in_stage1_and_generation_clis(demo_root, tmp_path):
    """Stage 1 and generation read the same baseline AP: the class with the lowest AP gets the largest budget."""
    from instsynth.reports.summary import run_summary

    metrics = _metrics(tmp_path / "baseline" / "inference" / "metrics.json",
                       segm={"AP": 20.0, "AP-car": 36.0, "AP-person": 36.0, "AP-truck": 4.0, "AP-bus": 9.0})
    work = tmp_path / "work"
    _script("process_clean_ver.py").main(["--train_folder", str(demo_root), "--k", "1", "--balance", "ap",
                                          "--baseline_metrics", str(metrics), "--out", str(work / "selection"),
                                          "--workers", "1"])
    meta = read_json(work / "selection" / "metadata.json")
    assert meta["class_budget"]["balance"] == "ap"
    assert meta["class_budget"]["per_class"] == {"car": 1, "person": 1, "truck": 3, "bus": 2}  # sqrt(36/4), sqrt(36/9)
    _script("generation/instance_generation.py").main([
        "--metadata", str(work / "selection" / "metadata.json"), "--folder", str(work / "generation"),
        "--balance", "ap", "--baseline_metrics", str(tmp_path / "baseline")])
    manifest = read_json(work / "generation" / "Recolor" / "generation.json")
    assert manifest["params"]["budget"]["per_class"] == meta["class_budget"]["per_class"]
    assert manifest["params"]["baseline_metrics"] == str(tmp_path / "baseline")
    for entry in manifest["instances"].values():
        assert len(entry["samples"]) == meta["class_budget"]["per_class"].get(entry["class"], 1)
    table = run_summary(work, tmp_path / "no-output")["classes"]
    assert table["truck"]["k"] == 3 and table["truck"]["samples_per_instance"] == 3
    assert table["car"]["k"] == 1 and table["car"]["samples_per_instance"] == 1
