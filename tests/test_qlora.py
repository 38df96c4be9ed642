"""QLoRA stage 2 (`train_mem --bits 4/8`) through upstream's train script, on CPU.

bitsandbytes 0.50's CPU backend quantizes, runs forward and backward through Linear4bit
and Linear8bitLt, so the tiny kit trains here as a 24 GB GPU would: stage 1 as usual,
then stage 2 with `--bits 4 --bf16 True` (bf16 is what makes upstream cast the
projector) and `--bits 8`. Each stage 2 runs `python -m llava.train.train_mem`'s code in
a child process whose LLaVATrainer reports what it trained: the type and dtype of every
Linear layer at the first step, and the optimizer's learning rate per parameter.
`compat.training.qlora_training` is what makes these runs work (tests/test_compat.py
shows upstream failing without it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from feallm_llava.recipe import TinyRecipe

ROOT = Path(__file__).resolve().parents[1]
PROJECTOR_LR, LORA_LR, STEPS = 2e-5, 2e-4, 4

# The child: LLaVATrainer.train reports, then train_mem runs as `python -m` runs it.
CHILD = (
    "import runpy, sys\n"
    "from tests.test_qlora import report_training\n"
    "report_training(sys.argv[1])\n"
    "sys.argv = ['llava.train.train_mem', *sys.argv[2:]]\n"
    "runpy.run_module('llava.train.train_mem', run_name='__main__', alter_sys=True)\n"
)


def report_training(path: str) -> None:
    """Make LLaVATrainer.train write what it trains to `path` (JSON) when it is done."""
    import feallm_llava

    feallm_llava.register()
    from llava.train import llava_trainer

    train = llava_trainer.LLaVATrainer.train

    def reporting_train(self, *args, **kwargs):
        layers = linear_layers(self.model)
        result = train(self, *args, **kwargs)
        names = {id(p): short(n) for n, p in self.model.named_parameters()}
        lrs = {names[id(p)]: group.get("initial_lr", group["lr"])
               for group in self.optimizer.param_groups for p in group["params"]}
        Path(path).write_text(json.dumps({"linear": layers, "lr": lrs, "memory": memory(self.model)}))
        return result

    llava_trainer.LLaVATrainer.train = reporting_train


def short(name: str) -> str:
    """A parameter's or module's name in the LLaVA model, without PEFT's wrapping."""
    return name.replace("base_model.model.", "", 1).replace(".base_layer", "")


def linear_layers(model) -> dict[str, list[str]]:
    """{name: [class, weight dtype]} of every Linear layer but LoRA's own A / B."""
    return {short(n): [type(m).__name__, str(m.weight.dtype).replace("torch.", "")]
            for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".lora_" not in n}


def memory(model) -> dict[str, int]:
    """Bytes held by the LLM's decoder-layer Linear weights, and what they take in float32."""
    held = full = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name and ".lora_" not in name \
                and "vision_tower" not in name:
            held += module.weight.numel() * module.weight.element_size()
            full += module.in_features * module.out_features * 4
    return {"llm_linear_bytes": held, "llm_linear_float32_bytes": full}


def bitsandbytes_trains_on_cpu(bits: int) -> str | None:
    """None when a bitsandbytes layer of that width trains on this CPU, else why not."""
    try:
        import bitsandbytes as bnb

        layer = (bnb.nn.Linear4bit(16, 16, compute_dtype=torch.float32) if bits == 4
                 else bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False))
        layer.load_state_dict(torch.nn.Linear(16, 16).state_dict())
        layer = layer.to("cpu")
        x = torch.randn(2, 16, requires_grad=True)
        layer(x).sum().backward()
        return None if x.grad is not None else "no gradient"
    except Exception as err:  # noqa: BLE001 - any failure means: no CPU backend for it here
        return f"{type(err).__name__}: {err}"


@pytest.fixture(scope="module")
def stage1(kit, tmp_path_factory) -> TinyRecipe:
    recipe = TinyRecipe(out=tmp_path_factory.mktemp("qlora"), kit=kit.root, steps1=2, steps2=STEPS,
                        save_steps=10, lr2=LORA_LR, projector_lr=PROJECTOR_LR)
    recipe.run(stages=(1,))
    return recipe


def run_stage2(recipe: TinyRecipe, bits: int, extra: str = "") -> tuple[Path, dict]:
    """Stage 2 with `--bits`; (its output folder, what the trainer reported)."""
    reason = bitsandbytes_trains_on_cpu(bits)
    if reason:
        pytest.skip(f"bitsandbytes cannot train {bits}-bit on this CPU: {reason}")
    out = recipe.out / f"llava-tiny-q{bits}-lora"  # "llava" + "lora": upstream's loader merges LoRA
    report = recipe.out / f"q{bits}-report.json"
    argv = recipe.stage_argv(2) + ["--bits", str(bits), "--output_dir", str(out), *extra.split()]
    assert argv[1:3] == ["-m", "llava.train.train_mem"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([argv[0], "-c", CHILD, str(report), *argv[3:]], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, json.loads(report.read_text())


@pytest.fixture(scope="module")
def qlora4(stage1):
    return run_stage2(stage1, 4, "--bf16 True")


@pytest.fixture(scope="module")
def qlora8(stage1):
    return run_stage2(stage1, 8)


def parts(layers: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
    """The Linear layers by part of the model: llm (decoder layers), projector, tower, lm_head."""
    out: dict[str, dict[str, list[str]]] = {"llm": {}, "projector": {}, "tower": {}, "lm_head": {}}
    for name, kind in layers.items():
        part = ("projector" if ".mm_projector." in name else "tower" if ".vision_tower." in name
                else "lm_head" if name == "lm_head" else "llm" if name.startswith("model.layers.") else None)
        assert part, f"a Linear layer outside the parts: {name}"
        out[part][name] = kind
    return out


def check_quantized_llm_only(layers, quantized: str, projector_dtype: str = "float32"):
    by_part = parts(layers)
    assert len(by_part["llm"]) == 14 and len(by_part["projector"]) > 10 and len(by_part["tower"]) > 100
    assert {kind for kind, _ in by_part["llm"].values()} == {quantized}, by_part["llm"]
    for part in ("projector", "tower", "lm_head"):  # plain torch Linear layers, floating weights
        assert {kind for kind, _ in by_part[part].values()} == {"Linear"}, (part, by_part[part])
    assert {dtype for _, dtype in by_part["projector"].values()} == {projector_dtype}
    assert all(dtype in ("float32", "bfloat16", "float16") for part in ("tower", "lm_head")
               for _, dtype in by_part[part].values())


def check_learning_rates(lrs: dict[str, float]):
    projector = {n: lr for n, lr in lrs.items() if ".mm_projector." in n}
    others = {n: lr for n, lr in lrs.items() if n not in projector}
    assert projector and set(projector.values()) == {PROJECTOR_LR}
    assert others and all(".lora_A." in n or ".lora_B." in n for n in others), sorted(others)[:5]
    assert set(others.values()) == {LORA_LR}


def check_saved_projector(run: Path, stage1: TinyRecipe, report: dict):
    saved = torch.load(run / "non_lora_trainables.bin", weights_only=True)
    first = torch.load(stage1.stage_dir(1) / "mm_projector.bin", weights_only=True)
    assert {short(k) for k in saved} == set(first)  # the whole projector, nothing else
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert {short(k) for k in saved} == {n for n in report["lr"] if ".mm_projector." in n}
    moved = sum(int((saved[k] != first[short(k)]).sum()) for k in saved)
    delta = max(float((saved[k] - first[short(k)]).abs().max()) for k in saved)
    total = sum(v.numel() for v in saved.values())
    # float32 keeps Adam's small steps (in bf16 most of them round away), and no step is
    # larger than the projector's own rate allows (LoRA's rate would allow 10x more)
    assert moved > 0.9 * total, (moved, total)
    assert 0 < delta <= STEPS * PROJECTOR_LR * 1.01, delta
    twin = run / "non_lora_trainables.safetensors"
    assert twin.is_file()


def test_qlora_4bit_quantizes_the_llm_and_keeps_projector_tower_and_lm_head(qlora4):
    _, report = qlora4
    check_quantized_llm_only(report["linear"], "Linear4bit")
    memory = report["memory"]  # nf4 with double quantization: 4 bits a weight
    assert memory["llm_linear_bytes"] * 8 == memory["llm_linear_float32_bytes"], memory


def test_qlora_4bit_trains_lora_and_the_float32_projector_at_its_own_rate(qlora4, stage1):
    run, report = qlora4
    check_learning_rates(report["lr"])
    check_saved_projector(run, stage1, report)
    state = json.loads((run / "trainer_state.json").read_text())
    assert len([h for h in state["log_history"] if "loss" in h]) == STEPS


def test_qlora_4bit_checkpoint_loads_with_upstream_loader_and_generates(qlora4, kit, load_lora_and_answer):
    run, _ = qlora4
    config = json.loads((run / "config.json").read_text())
    assert "quantization_config" not in config  # the base it names is not quantized
    model = load_lora_and_answer(run, kit.llm)
    assert {type(m).__name__ for m in model.modules()} >= {"FeallmProjector"}
    quantized = load_lora_and_answer(run, kit.llm, load_4bit=True)  # as it was trained
    kinds = {type(m).__name__ for n, m in quantized.named_modules() if n.startswith("model.layers.")}
    assert "Linear4bit" in kinds


def test_qlora_8bit_trains_and_loads(qlora8, stage1, kit, load_lora_and_answer):
    run, report = qlora8
    check_quantized_llm_only(report["linear"], "Linear8bitLt")
    check_learning_rates(report["lr"])
    check_saved_projector(run, stage1, report)
    assert "quantization_config" not in json.loads((run / "config.json").read_text())
    load_lora_and_answer(run, kit.llm, load_8bit=True)


def test_runs_without_bits_are_upstream_untouched(monkeypatch):
    """The shim reads --bits; without it train() runs with nothing swapped, with it the
    swaps hold during the call only (also when train() raises)."""
    from transformers import PretrainedConfig, PreTrainedModel

    from feallm_llava.integration.compat.training import _bits_from_argv, qlora_training

    seen = []

    def upstream_train(attn_implementation=None):
        seen.append((vars(PreTrainedModel)["from_pretrained"], vars(PretrainedConfig)["save_pretrained"]))
        if attn_implementation == "fail":
            raise RuntimeError("inside train()")

    class Module:
        train = staticmethod(upstream_train)

    originals = (vars(PreTrainedModel)["from_pretrained"], vars(PretrainedConfig)["save_pretrained"])
    qlora_training.apply(Module)
    for argv, swapped in ((["train_mem.py", "--lora_enable", "True"], False), (["x", "--bits", "16"], False),
                          (["x", "--bits", "4"], True), (["x", "--bits=8"], True)):
        monkeypatch.setattr(sys, "argv", argv)
        Module.train()
        assert (seen[-1] != originals) == swapped, argv
        assert seen[-1][0] is not originals[0] if swapped else seen[-1] == originals
        assert (vars(PreTrainedModel)["from_pretrained"], vars(PretrainedConfig)["save_pretrained"]) == originals
    monkeypatch.setattr(sys, "argv", ["x", "--bits", "4"])
    with pytest.raises(RuntimeError, match="inside train"):
        Module.train(attn_implementation="fail")
    assert (vars(PreTrainedModel)["from_pretrained"], vars(PretrainedConfig)["save_pretrained"]) == originals
    assert [_bits_from_argv(a) for a in (["--bits", "4"], ["--bits=8"], ["--bits", "16"], [], ["--bits", "x"],
                                         ["--bits", "8", "--bits", "4"])] == [4, 8, None, None, None, 4]
