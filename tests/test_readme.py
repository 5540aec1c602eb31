"""The documentation's commands run: README.md, INSTALL.md and docs/*.md.

The rule (also stated in the README): every fenced block opened with exactly ```bash is a complete
command that runs on the demo dataset; it is executed. Synopses with ``[optional]`` arguments,
installs, and commands that need a GPU, real weights or real Cityscapes are ```sh blocks (or
```text / ```yaml / ```python) and are only read. A ```bash block that contains ``[`` fails here.

All ```bash blocks run in order (README first, then docs/ in pipeline order) with ``bash -euo
pipefail`` in one temporary folder that holds links to the repository's files and a small demo tree
(``python -m instsynth.demo ... --size 512x256``) at ``datasets/cityscapes``, the one dataset root the
documents use. ``python`` is this interpreter; the repository is on PYTHONPATH.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Pipeline order: a later document may use the outputs of an earlier one.
DOC_ORDER = ["selection", "generation", "quality", "integration", "assembly", "full_run", "training",
             "own_dataset", "visualization", "experiments", "errors", "benchmarks"]
NOT_LINKED = {".git", ".venv", "datasets", "output", "demo_output", ".pytest_cache", "build", "weights"}
BLOCK_TIMEOUT_S = 300
FENCE = re.compile(r"^```(\S*)\s*$")


def documents() -> list[Path]:
    """README.md, docs/*.md in DOC_ORDER (others alphabetically after), INSTALL.md."""
    docs = sorted((ROOT / "docs").glob("*.md"), key=lambda p: (
        DOC_ORDER.index(p.stem) if p.stem in DOC_ORDER else len(DOC_ORDER), p.stem))
    return [ROOT / "README.md", *docs, ROOT / "INSTALL.md"]


def blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, first line number, text) of every fenced block of a Markdown file."""
    found, lang, start, body = [], None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = FENCE.match(line)
        if lang is None and match:
            lang, start, body = match.group(1), number, []
        elif lang is not None and line.strip() == "```":
            found.append((lang, start, "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"{path.name}:{start}: unclosed code block"
    return found


def bash_blocks() -> list[tuple[str, str]]:
    """(``file:line``, script) of every ```bash block, in run order."""
    return [(f"{path.relative_to(ROOT)}:{line}", text)
            for path in documents() if path.exists()
            for lang, line, text in blocks(path) if lang == "bash"]


def test_rule_is_kept():
    """README says `make test` and states the rule; no ```bash block has [optional] brackets."""
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme
    assert "```bash" in readme and "tests/test_readme.py" in readme
    offenders = [where for where, text in bash_blocks() if "[" in text]
    assert not offenders, f"```bash blocks are run; mark synopses with [optional] parts ```sh: {offenders}"
    assert (ROOT / "INSTALL.md").exists()
    assert len(bash_blocks()) >= 10


def _workspace(tmp: Path) -> dict:
    """Link the repository's files into tmp, build the demo tree, return the environment."""
    for entry in ROOT.iterdir():
        if entry.name not in NOT_LINKED:
            (tmp / entry.name).symlink_to(entry)
    env = dict(os.environ, OMP_NUM_THREADS="1", INSTSYNTH_NO_PROGRESS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
               INSTSYNTH_DEMO_DIR=str(tmp / ".demo_cache"))
    for key in ("INSTSYNTH_DATASETS", "INSTSYNTH_CATALOG", "INSTSYNTH_CITYSCAPES", "INSTSYNTH_CITYSCAPES_INSTSYNTH"):
        env.pop(key, None)
    subprocess.run([sys.executable, "-m", "instsynth.demo", "datasets/cityscapes", "--size", "512x256",
                    "--cities", "2", "--images-per-city", "2"], cwd=tmp, env=env, check=True,
                   capture_output=True)
    return env


def test_documented_commands_run(tmp_path):
    """Every ```bash block of the documents runs, in order, on the demo tree."""
    env = _workspace(tmp_path)
    for where, script in bash_blocks():
        began = time.monotonic()
        try:
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{where}: block ran past {BLOCK_TIMEOUT_S} s:\n{script}")
        seconds = time.monotonic() - began
        print(f"{where}: exit {done.returncode} in {seconds:.1f} s")
        if done.returncode != 0:
            tail = (done.stdout + done.stderr)[-3000:]
            pytest.fail(f"{where}: block failed (exit {done.returncode}):\n{script}\n--- output ---\n{tail}")
    for coco in sorted(tmp_path.glob("datasets/*_instsynth/annotations/instancesonly_filtered_gtFine_train.json")):
        images = json.loads(coco.read_text())["images"]
        assert any("_syn/" in image["file_name"] for image in images), f"{coco}: no synthetic image (one output folder?)"
