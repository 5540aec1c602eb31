"""The redesign changes no output byte: both demo runs hash as recorded before it (tests/golden_runs.py)."""
import fnmatch
import json

import pytest

from golden_runs import HASHES, golden_hashes

DELIBERATE: dict[str, dict[str, str]] = {
    "cityscapes": {"demo_output/work/summary.json": "issue 17: the run summary's class table lists every category with its totals in the split before and after",
                   "demo_output/cityscapes_instsynth/gtFine/train/*_syn/*_gtFine_polygons.json":
                       "issue 20 point 7: stage 5 writes one object per instance in depth order, which json2instanceImg draws back exactly"},
    "coco": {"work/summary.json": "issue 17: the run summary's class table lists every category with its totals in the split before and after",
             "work/selection/metadata.json": "issue 21: stage 1 records the COCO file's fingerprint (size, mtime_ns, sha256), which integration trusts"},
}
"""Files whose bytes changed on purpose since the recording, by run: path (or fnmatch pattern) -> why."""


def deliberate(run: str, path: str) -> bool:
    """True when ``path`` of ``run`` changed on purpose (named or matched in DELIBERATE)."""
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in DELIBERATE[run])


@pytest.fixture(scope="module")
def hashes(tmp_path_factory):
    return golden_hashes(tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("run", ["cityscapes", "coco"])
def test_demo_run_is_byte_identical(hashes, run):
    recorded, found = json.loads(HASHES.read_text())[run], hashes[run]
    changed = {p for p in recorded.keys() & found.keys() if recorded[p] != found[p] and not deliberate(run, p)}
    missing, extra = sorted(recorded.keys() - found.keys()), sorted(found.keys() - recorded.keys())
    assert not (changed or missing or extra), (
        f"{run}: {len(changed)} files changed (e.g. {sorted(changed)[:5]}), {len(missing)} missing "
        f"(e.g. {missing[:5]}), {len(extra)} new (e.g. {extra[:5]})")
    assert len(found) > 50  # both runs write their whole tree
