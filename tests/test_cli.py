"""Every command-line script of the project answers --help (found automatically, so new ones are covered)."""
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT_DIRS = [".", "generation", "cityscapes-to-coco-conversion", "visualization", "benchmarks"]
SCRIPTS = sorted(p for d in SCRIPT_DIRS for p in (REPO / d).glob("*.py") if p.name not in ("setup.py", "conftest.py"))
MODULES = ["instsynth.demo", "instsynth.modeling.convert"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_script_help(script):
    res = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "usage" in res.stdout.lower()


@pytest.mark.parametrize("module", MODULES)
def test_module_help(module):
    res = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0 and "usage" in res.stdout.lower()
