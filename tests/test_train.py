"""Upstream's train script trains FEALLM (stage 1 and LoRA stage 2) and its loader loads it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_tiny(out: Path, kit, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "OUT": str(out), "KIT": str(kit.root), "PY": sys.executable, **env}
    return subprocess.run(["bash", str(ROOT / "launch" / "tiny_cpu.sh")], env=full,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny_run(kit, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    proc = run_tiny(out, kit, STEPS1="4", STEPS2="6", LR2="2e-3", SAVE_STEPS="3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _losses(run_dir: Path) -> list[float]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def projector_keys(model) -> set[str]:
    return {k for k in model.state_dict() if "mm_projector." in k}


def test_stage1_saves_every_projector_tensor(tiny_run, kit):
    from feallm_llava.model.weights import load_weights
    from feallm_llava.tinykit import build_llava_model

    saved = torch.load(tiny_run / "llava-tiny-feallm-pretrain" / "mm_projector.bin", weights_only=True)
    expected = projector_keys(build_llava_model(kit, "feallm", mm_feallm_crop_size=32, mm_feallm_mpp_dim=0))
    assert set(saved) == expected
    assert any(".lca." in k for k in saved) and any(".mpp." in k for k in saved)
    twin = load_weights(tiny_run / "llava-tiny-feallm-pretrain" / "mm_projector.safetensors")
    assert all(torch.equal(twin[k], saved[k]) for k in saved)


def test_stage1_loss_decreases(tiny_run):
    losses = _losses(tiny_run / "llava-tiny-feallm-pretrain")
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_same_seed_gives_the_same_stage1_projector(kit, tmp_path):
    # upstream builds the projector before the Trainer seeds; compat's seed_model_init
    # seeds first, so two launches with the same flags train the same weights
    runs = []
    for name in ("a", "b"):
        proc = run_tiny(tmp_path / name, kit, STAGES="1", STEPS1="2", SAVE_STEPS="2")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs.append(torch.load(tmp_path / name / "llava-tiny-feallm-pretrain" / "mm_projector.bin", weights_only=True))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_stage2_saves_lora_adapter_and_projector(tiny_run):
    run = tiny_run / "llava-tiny-feallm-lora"
    assert (run / "adapter_model.safetensors").exists()
    non_lora = torch.load(run / "non_lora_trainables.bin", weights_only=True)
    assert any("mm_projector.lca." in k for k in non_lora) and any("mm_projector.mpp." in k for k in non_lora)
    assert not any("lora_" in k or "base_layer" in k for k in non_lora)
    losses = _losses(run)
    assert losses[-1] < losses[0]


def _load(path, base, name):
    from llava.model.builder import load_pretrained_model

    return load_pretrained_model(str(path), base and str(base), name, device="cpu", device_map="cpu")


def test_lora_checkpoint_loads_with_projector_restored(tiny_run, kit, load_lora_and_answer):
    load_lora_and_answer(tiny_run / "llava-tiny-feallm-lora", kit.llm)


def test_projector_only_checkpoint_loads(tiny_run, kit, describe_face):
    run = tiny_run / "llava-tiny-feallm-pretrain"
    tokenizer, model, processor, _ = _load(run, kit.llm, "llava-tiny-feallm-pretrain")
    saved = torch.load(run / "mm_projector.bin", weights_only=True)
    state = model.state_dict()
    assert all(torch.equal(state[k], v.to(torch.float16)) for k, v in saved.items())
    assert isinstance(describe_face(tokenizer, model, processor), str)


def test_full_checkpoint_loads(tmp_path, kit, describe_face):
    from feallm_llava.tinykit import build_llava, build_llava_model

    path = build_llava(tmp_path / "llava-tiny-full", kit)
    reference = build_llava_model(kit)
    tokenizer, model, processor, _ = _load(path, None, path.name)
    state = model.state_dict()
    for key, value in reference.state_dict().items():
        if "mm_projector." in key:
            assert torch.equal(state[key], value.to(state[key].dtype)), key
    assert isinstance(describe_face(tokenizer, model, processor), str)


def test_resume_after_sigkill_finishes_with_same_projector_keys(kit, tmp_path, tiny_run):
    """SIGKILL stage 1 once a checkpoint exists; the next run resumes from it and finishes."""
    steps = 30
    out = tmp_path / "resume"
    settings = {"STEPS1": str(steps), "SAVE_STEPS": "2", "DATA": str(tiny_run / "data"), "STAGES": "1"}
    env = {**os.environ, "OUT": str(out), "KIT": str(kit.root), "PY": sys.executable, **settings}
    stage1 = out / "llava-tiny-feallm-pretrain"
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "tiny_cpu.sh")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not list(stage1.glob("checkpoint-*/feallm_checkpoint_complete")):
        assert proc.poll() is None and time.time() < deadline, "stage 1 ended before its first checkpoint"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (stage1 / "mm_projector.bin").exists(), "killed too late: the run had finished"
    from feallm_llava.integration.registry.trainer import last_complete_checkpoint

    resumed_from = int(Path(last_complete_checkpoint(str(stage1))).name.split("-")[1])
    done = run_tiny(out, kit, **settings)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert log.count("{'loss'") == steps - resumed_from  # continued, not restarted
    state = json.loads((stage1 / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == list(range(1, steps + 1))
    final = torch.load(stage1 / "mm_projector.bin", weights_only=True)
    first = torch.load(tiny_run / "llava-tiny-feallm-pretrain" / "mm_projector.bin", weights_only=True)
    assert set(final) == set(first)


def test_training_from_a_llava_checkpoint_starts_feallm_from_its_mlp(kit, tmp_path, describe_face):
    """The paper builds on LLaVA-1.5: stage 1 from a LLaVA checkpoint trains a FEALLM
    projector whose MLP starts as the checkpoint's mlp2x_gelu (lr 0 keeps it there), and
    the LoRA checkpoint of stage 2 loads with that LLaVA checkpoint as its base."""
    from safetensors.torch import load_file

    from feallm_llava.model.projector import FeallmProjector
    from feallm_llava.recipe import TinyRecipe
    from feallm_llava.tinykit import build_llava

    base = build_llava(tmp_path / "llava-15-like", kit, "mlp2x_gelu", seed=3)
    old = load_file(str(base / "model.safetensors"))
    recipe = TinyRecipe(out=tmp_path / "run", kit=kit.root, model=base, data=tmp_path / "data",
                        steps1=2, steps2=2, lr1=0.0, save_steps=10)
    recipe.run()
    stage1 = torch.load(recipe.stage_dir(1) / "mm_projector.bin", weights_only=True)
    assert any(".lca." in k for k in stage1)
    for part in ("0.weight", "0.bias", "2.weight", "2.bias"):
        assert torch.equal(stage1[f"model.mm_projector.mpp.mlp.{part}"], old[f"model.mm_projector.{part}"]), part
    tokenizer, model, processor, _ = _load(recipe.stage_dir(2), base, recipe.stage_dir(2).name)
    assert isinstance(model.get_model().mm_projector, FeallmProjector)
    assert isinstance(describe_face(tokenizer, model, processor), str)


def test_resume_skips_a_checkpoint_torn_by_a_kill(tmp_path):
    """The newest checkpoint written to the end: the marker the trainer writes last, or in
    a folder saved without markers, a trainer state that parses (a kill mid-save left an
    empty one)."""
    from feallm_llava.integration.registry.trainer import COMPLETE, last_complete_checkpoint

    def checkpoint(step: int, state: str, marker: bool) -> Path:
        folder = tmp_path / "run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(state)
        if marker:
            (folder / COMPLETE).touch()
        return folder

    assert last_complete_checkpoint(str(tmp_path / "run")) is None
    checkpoint(2, '{"global_step": 2}', marker=False)
    legacy_good = checkpoint(4, '{"global_step": 4}', marker=False)
    checkpoint(6, "", marker=False)                                  # torn
    assert last_complete_checkpoint(str(tmp_path / "run")) == str(legacy_good)
    marked = checkpoint(8, '{"global_step": 8}', marker=True)
    checkpoint(10, '{"global_step": 10}', marker=False)              # killed before its marker
    assert last_complete_checkpoint(str(tmp_path / "run")) == str(marked)
