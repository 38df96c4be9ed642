"""patches/*.patch apply to the llava-torch 1.2.2.post1 sources and make them work unshimmed.

The installed llava package is copied to a temporary directory; every patch must apply
there on its own (patch and git apply, no fuzz, no offset), and all of them in order.
The patched copy is then imported first on PYTHONPATH in a fresh Python with
`FEALLM_LLAVA_AUTOLOAD=0` (no runtime shim armed) and put through the same probes as
tests/test_compat.py, plus a real two-step `python -m llava.train.train_mem` run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_compat import (
    build_probe_checkpoint,
    loss_normalisation_agrees,
    probe_in_fresh_python,
)

ROOT = Path(__file__).resolve().parents[1]
PATCHES = sorted((ROOT / "patches").glob("*.patch"))


def installed_llava() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llava")
    assert spec is not None and spec.origin, "llava-torch is not installed"
    return Path(spec.origin).parent


def copy_llava(dest: Path) -> Path:
    """`dest/llava/...`: the installed package without bytecode caches."""
    shutil.copytree(installed_llava(), dest / "llava", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def run(cmd: list[str], cwd: Path, stdin: Path | None = None) -> subprocess.CompletedProcess:
    # git must not find a repository above the copy (it would apply relative to that one)
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(Path(cwd).parent)}
    with open(stdin) if stdin else open(os.devnull) as feed:
        return subprocess.run(cmd, cwd=cwd, stdin=feed, env=env, capture_output=True, text=True,
                              timeout=60, check=False)


def tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return copy_llava(tmp_path_factory.mktemp("pristine"))


@pytest.fixture(scope="module")
def patched(tmp_path_factory) -> Path:
    """A copy with every patch applied in order by GNU patch."""
    root = copy_llava(tmp_path_factory.mktemp("patched"))
    for patch in PATCHES:
        proc = run(["patch", "-p1", "--forward", "--fuzz=0", "--no-backup-if-mismatch"], root, stdin=patch)
        assert proc.returncode == 0, f"{patch.name} did not apply in order:\n{proc.stdout}{proc.stderr}"
    return root


@pytest.fixture(scope="module")
def probes(kit, patched, tmp_path_factory):
    checkpoint = build_probe_checkpoint(kit, tmp_path_factory)
    return probe_in_fresh_python(kit.root, checkpoint, tmp_path_factory.mktemp("patched-probes"),
                                 pythonpath=[str(patched)], train=True)


def test_patch_series_is_numbered_and_documented():
    assert [p.name[:5] for p in PATCHES] == [f"{i:04d}-" for i in range(1, len(PATCHES) + 1)]
    assert len(PATCHES) >= 7
    readme = (ROOT / "patches" / "README.md").read_text()
    for patch in PATCHES:
        assert patch.name in readme, f"patches/README.md does not describe {patch.name}"


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name[:4])
def test_patch_touches_only_llava_paths(patch):
    text = patch.read_text()
    old = re.findall(r"^--- (\S+)", text, re.MULTILINE)
    new = re.findall(r"^\+\+\+ (\S+)", text, re.MULTILINE)
    assert old and len(old) == len(new)
    for a, b in zip(old, new):
        assert a.startswith("a/llava/") and b == "b/" + a[2:], (a, b)


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name[:4])
def test_patch_applies_alone_to_pristine_wheel_sources(patch, pristine):
    proc = run(["patch", "--dry-run", "-p1", "--forward", "--fuzz=0"], pristine, stdin=patch)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "offset" not in proc.stdout and "fuzz" not in proc.stdout, proc.stdout
    if shutil.which("git"):
        check = run(["git", "apply", "--check", "-v", str(patch)], pristine)
        assert check.returncode == 0, check.stderr


def test_git_apply_of_the_whole_series_equals_patch_in_order(patched, tmp_path):
    if not shutil.which("git"):
        pytest.skip("git is not installed")
    root = copy_llava(tmp_path)
    proc = run(["git", "apply", *map(str, PATCHES)], root)
    assert proc.returncode == 0, proc.stderr
    assert tree_files(root / "llava") == tree_files(patched / "llava")


def test_patched_copy_differs_from_the_wheel_only_in_patched_files(patched, pristine):
    named = {m for p in PATCHES for m in re.findall(r"^\+\+\+ b/(\S+)", p.read_text(), re.MULTILINE)}
    before, after = tree_files(pristine), tree_files(patched)
    assert before.keys() == after.keys()
    assert {name for name in before if before[name] != after[name]} == named


def test_probe_process_imports_the_patched_llava_with_no_shim(probes, patched):
    seen = probes["llava_file"]
    assert seen["path"] == str(patched / "llava" / "__init__.py")
    assert seen["hooks_armed"] == []


def test_patched_llava_train_imports_on_this_transformers(probes):
    assert probes["layernorm_layers"] == {"ok": True}


def test_patched_forward_accepts_cache_position(probes):
    outcome = probes["open_forward"]
    assert outcome["ok"], outcome
    assert outcome["same_logits"] and len(outcome["generated"][0]) == 3


def test_patched_forward_and_trainer_agree_on_loss_normalisation(probes):
    assert loss_normalisation_agrees(probes), (probes["trainer"], probes["open_forward"])


def test_patched_trainer_takes_the_dataset_argument(probes):
    assert probes["train_sampler"] == {"ok": True, "sampler": "LengthGroupedSampler", "length": 8}


def test_patched_trainer_saves_full_checkpoints(probes):
    outcome = probes["save_checkpoint_metrics"]
    assert outcome["ok"], outcome
    assert {"config.json", "model.safetensors"} <= set(outcome["files"])


def test_patched_trainer_accepts_the_tokenizer(probes):
    assert probes["trainer_tokenizer"] == {"ok": True}


def test_patched_train_mem_loads_the_model_without_flash_attn(probes):
    from feallm_llava.compat import flash_attn_available

    if flash_attn_available():
        pytest.skip("flash-attn and CUDA present: train_mem keeps flash_attention_2")
    outcome = probes["flash_attn_fallback"]  # past the model load, stopped by the missing data file
    assert outcome["type"] == "FileNotFoundError" and "feallm-probe-data.json" in outcome["message"], outcome


def test_patched_train_mem_trains_and_saves(probes):
    outcome = probes["train_mem"]
    assert outcome["ok"], outcome
    assert len(outcome["losses"]) == 2
    assert {"checkpoint-1", "checkpoint-2", "model.safetensors", "trainer_state.json"} <= set(outcome["files"])


def test_patched_builder_loads_4bit_without_quantizing_projector(probes):
    outcome = probes["quantized_loading"]
    if not outcome["ok"] and "bitsandbytes" in (outcome["message"] + outcome["where"]).lower():
        pytest.skip(f"bitsandbytes cannot quantize on this machine: {outcome['message'][:300]}")
    assert outcome["ok"], outcome
    kinds = outcome["linear_kinds"]
    assert kinds["model.layers.0.mlp.down_proj"] == "Linear4bit"
    assert kinds["model.mm_projector.0"] == kinds["model.mm_projector.2"] == kinds["lm_head"] == "Linear"
    assert len(outcome["generated"][0]) == 2
