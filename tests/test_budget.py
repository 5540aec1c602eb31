"""Per-class budgets: rare classes get more instances per image (stage 1) and more samples (generation)."""
import pytest

from instsynth.budget import balance_factors, class_budget, parse_class_values
from instsynth.io import InstSynthError, read_json


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
    from instsynth.summary import format_summary, run_summary

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
                     str(table["truck"]["selected"]), str(budget["truck"]), str(table["truck"]["samples"])]


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

    from instsynth.labels import label_id
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
