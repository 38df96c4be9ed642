"""The package stands alone: its wheel, installed into a fresh environment as README says
(torch, `llava-torch --no-deps`, then the wheel with its requirements), builds the FEA
set and starts the demo from a folder that is not the checkout.

The fresh environment takes its packages from pip's cache and the pinned wheels on disk
(the bootstrap fetched the same versions), so this costs a few minutes, not downloads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(cmd, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    # no PYTHONPATH and a cwd outside the checkout: nothing of the checkout is importable
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # built from a copy: setuptools writes build/ and egg-info into the tree it builds
    source = tmp_path_factory.mktemp("source") / "feallm-llava"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "runs", "build", "dist", "*.egg-info", "__pycache__", ".cache", "demo-out"))
    dist = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, source], cwd=dist)
    (found,) = dist.glob("feallm_llava-*.whl")
    return found


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, wheel) -> Path:
    """A new virtual environment with the wheel installed; returns its bin folder."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    home = venv.parent
    run([sys.executable, "-m", "venv", venv], cwd=home)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q"]
    run([*pip, "torch==2.13.0"], cwd=home)
    run([*pip, "--no-deps", "llava-torch==1.2.2.post1"], cwd=home)
    run([*pip, wheel], cwd=home)
    return venv / "bin"


def test_wheel_carries_the_package_data_and_the_autoload_hook(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind in ("summary", "movement", "reasoning"):
        assert f"feallm_llava/resources/templates/{kind}.json" in names
    assert {"feallm_llava/resources/serve_examples/synthetic_happiness.jpg",
            "feallm_llava/resources/serve_examples/astronaut.jpg"} <= names
    assert "feallm_llava_autoload.pth" in names
    assert not any(n.startswith(("tests/", "launch/")) for n in names)


def test_installed_package_is_the_wheel_and_registers_at_start_up(fresh, tmp_path):
    code = ("import sys, feallm_llava\n"
            "from feallm_llava.integration.compat.serving import serve_example_rows\n"
            "from feallm_llava.data.templates import load_templates\n"
            "import os\n"
            "print(feallm_llava.__file__)\n"
            "print(all(os.path.isfile(p) for p, _q in serve_example_rows()), len(load_templates()))\n")
    out = run([fresh / "python", "-c", code], cwd=tmp_path).stdout.split()
    assert Path(out[0]).is_relative_to(fresh.parent) and out[1:] == ["True", "3"]
    started = run([fresh / "python", "-c", "import sys; print('feallm_llava' in sys.modules)"], cwd=tmp_path)
    assert started.stdout.strip() == "True"  # the .pth hook imported the package at start-up


def test_demo_until_dataset_and_build_dataset_run_from_any_directory(fresh, tmp_path):
    run([fresh / "feallm", "demo", "--until", "dataset", "--out", "demo", "--subjects", "6", "--frames", "4"],
        cwd=tmp_path)
    demo = tmp_path / "demo"
    assert json.loads((demo / "fea" / "train.json").read_text())
    run([fresh / "feallm", "build-dataset", "--source", "affwild2", "--root", demo / "affwild2",
         "--out", "fea", "--annotator", "template", "--eval-size", "2", "--no-progress"], cwd=tmp_path)
    train = json.loads((tmp_path / "fea" / "train.json").read_text())
    questions = {turn["value"] for sample in train for turn in sample["conversations"] if turn["from"] == "human"}
    assert train and any("Please describe" in q or "?" in q for q in questions)
    assert json.loads((tmp_path / "fea" / "eval.json").read_text())
