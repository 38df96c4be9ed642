"""`--mm_projector_type feallm` inside upstream LLaVA: build, train step, generate, reload."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from feallm_llava.tinykit import build_llava, build_llava_model
from tests.test_stack import _image, _prompt_ids, greedy_no_cache

SMALL = {"mm_feallm_crop_size": 32, "mm_feallm_mpp_dim": 0}
LLAMA_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def feallm_model(kit):
    return build_llava_model(kit, "feallm", **SMALL).eval()


def test_registry_builds_feallm_modules(feallm_model, kit):
    from feallm_llava.model.projector import FeallmProjector
    from feallm_llava.integration.tower import FeallmVisionTower

    inner = feallm_model.get_model()
    assert isinstance(inner.mm_projector, FeallmProjector)
    assert isinstance(inner.vision_tower, FeallmVisionTower)
    side = kit.spec.image_size // kit.spec.patch_size
    assert inner.vision_tower.num_patches == side * side + 1


def test_config_persists_feallm_fields(feallm_model):
    cfg = feallm_model.config
    assert cfg.mm_projector_type == "feallm"
    assert cfg.mm_feallm_shallow_layers == [3, 8, 13, 18] and cfg.mm_feallm_crop_size == 32


def test_other_projector_types_pass_through(kit):
    model = build_llava_model(kit, "linear")
    assert isinstance(model.get_model().mm_projector, torch.nn.Linear)


def test_tower_output_shapes(feallm_model, kit):
    tower = feallm_model.get_vision_tower()
    feats = tower(_image(kit).repeat(2, 1, 1, 1))
    side = kit.spec.image_size // kit.spec.patch_size
    assert feats.deep.shape == (2, side * side, kit.spec.clip_hidden)
    assert len(feats.shallow) == 4 and all(s.shape == feats.deep.shape for s in feats.shallow)
    assert feats.grid == (side, side) and feats.pixels.shape[0] == 2


def test_tower_deep_features_are_upstream_select_layer(feallm_model, kit):
    tower = feallm_model.get_vision_tower()
    image = _image(kit)
    hidden = tower.vision_tower(image, output_hidden_states=True).hidden_states
    feats = tower(image)
    assert torch.equal(feats.deep, hidden[-2][:, 1:])
    assert torch.equal(feats.shallow[0], hidden[3][:, 1:])


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (1, 1, 56, 56), (3, 56, 56)])
def test_tower_rejects_wrong_image_shape(feallm_model, kit, shape):
    size = kit.spec.image_size
    with pytest.raises(ValueError, match=rf"\(B, 3, {size}, {size}\)"):
        feallm_model.get_vision_tower()(torch.zeros(*shape))


def test_projector_emits_patches_plus_local_token(feallm_model, kit):
    feats = feallm_model.get_vision_tower()(_image(kit).repeat(2, 1, 1, 1))
    out = feallm_model.get_model().mm_projector(feats)
    side = kit.spec.image_size // kit.spec.patch_size
    assert out.shape == (2, side * side + 1, kit.spec.llm_hidden)


def test_forward_backward_reaches_every_projector_parameter(kit, tokenizer):
    model = build_llava_model(kit, "feallm", **SMALL)
    projector = model.get_model().mm_projector
    opt = torch.optim.SGD(projector.parameters(), lr=0.5)
    ids = _prompt_ids(tokenizer)
    labels = ids.masked_fill(ids < 0, -100)
    for _ in range(3):  # zero-initialised output projections / scales open up step by step
        opt.zero_grad()
        model(input_ids=ids, labels=labels, images=_image(kit)).loss.backward()
        opt.step()
    dead = [n for n, p in projector.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


def test_generate_equals_manual_greedy(feallm_model, kit, tokenizer):
    ids, image = _prompt_ids(tokenizer), _image(kit, seed=3)
    with torch.no_grad():
        generated = feallm_model.generate(ids, images=image, do_sample=False, max_new_tokens=6,
                                          min_new_tokens=6, pad_token_id=0)
        reference = greedy_no_cache(feallm_model, ids, image, 6)
    assert generated[0].tolist()[-6:] == reference


def test_save_and_from_pretrained_restore_outputs(kit, tokenizer, tmp_path):
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    path = build_llava(tmp_path / "llava-roundtrip", kit, **SMALL)
    original = build_llava_model(kit, "feallm", **SMALL).eval()
    loaded = LlavaLlamaForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    loaded.get_vision_tower().load_model()
    ids, image = _prompt_ids(tokenizer), _image(kit)
    with torch.no_grad():
        assert torch.allclose(original(input_ids=ids, images=image).logits,
                              loaded(input_ids=ids, images=image).logits, atol=1e-6)


def test_lora_wraps_no_projector_or_tower_module(kit):
    from peft import LoraConfig, get_peft_model

    from llava.train.train import find_all_linear_names

    model = build_llava_model(kit, "feallm", **SMALL)
    for name, _ in model.get_model().mm_projector.named_modules():
        assert name.rsplit(".", 1)[-1] not in LLAMA_LEAVES, name
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=find_all_linear_names(model)))
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert wrapped and not [n for n in wrapped if "mm_projector" in n or "vision_tower" in n]


def test_optimizer_gives_projector_its_own_learning_rate(kit, tmp_path):
    from peft import LoraConfig, get_peft_model

    from llava.train.llava_trainer import LLaVATrainer
    from llava.train.train import TrainingArguments, find_all_linear_names

    model = build_llava_model(kit, "feallm", **SMALL)
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=find_all_linear_names(model)))
    for p in model.get_model().mm_projector.parameters():
        p.requires_grad = True
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=2e-4, mm_projector_lr=2e-5,
                             report_to=[], use_cpu=True)
    optimizer = LLaVATrainer(model=model, args=args).create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr: dict[float, set[str]] = {}
    for group in optimizer.param_groups:
        kinds = {"projector" if "mm_projector" in names[id(p)] else "lora" for p in group["params"]}
        by_lr.setdefault(group["lr"], set()).update(kinds)
    assert by_lr == {2e-4: {"lora"}, 2e-5: {"projector"}}


def _load_in_fresh_python(path, kit, autoload: str) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        "from llava.model.builder import load_pretrained_model\n"
        f"tok, model, proc, n = load_pretrained_model({str(path)!r}, None, 'llava-tiny', device='cpu', device_map='cpu')\n"
        "assert 'feallm_llava' in sys.modules\n"
        "print(type(model.get_model().mm_projector).__name__)\n"
    )
    env = {**os.environ, "FEALLM_LLAVA_AUTOLOAD": autoload, "PYTHONPATH": ""}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd="/")


def test_upstream_loader_sees_feallm_without_our_import(kit, tmp_path):
    path = build_llava(tmp_path / "llava-auto", kit, **SMALL)
    proc = _load_in_fresh_python(path, kit, "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("FeallmProjector")


def test_autoload_off_gives_upstream_error(kit, tmp_path):
    path = build_llava(tmp_path / "llava-auto-off", kit, **SMALL)
    proc = _load_in_fresh_python(path, kit, "0")
    assert proc.returncode != 0
    assert "Unknown projector type: feallm" in proc.stderr


def test_pth_hook_does_not_import_torch_at_startup():
    code = "import sys; print('feallm_llava' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    assert out.stdout.split() == ["True", "False"]


def test_run_wrapper_registers_for_any_module(kit, tmp_path):
    path = build_llava(tmp_path / "llava-run", kit, **SMALL)
    code = (f"from llava.model.builder import load_pretrained_model as f; "
            f"print(type(f({str(path)!r}, None, 'llava-x', device='cpu', device_map='cpu')[1].get_model().mm_projector).__name__)")
    script = tmp_path / "probe.py"
    script.write_text(code)
    env = {**os.environ, "FEALLM_LLAVA_AUTOLOAD": "0"}
    proc = subprocess.run([sys.executable, "-m", "feallm_llava.run", str(script)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("FeallmProjector")


def test_feallm_from_a_llava_checkpoint_replaces_its_projector(kit, tmp_path):
    """The paper starts from LLaVA-1.5: its mlp2x_gelu becomes the FEALLM MLP's warm start."""
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    from feallm_llava.model.projector import FeallmProjector
    from feallm_llava.tinykit import llava_model_args

    path = build_llava(tmp_path / "llava-15-like", kit, "mlp2x_gelu")
    model = LlavaLlamaForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
    old_mlp = {k: v.clone() for k, v in model.get_model().mm_projector.state_dict().items()}
    model.get_model().initialize_vision_modules(model_args=llava_model_args(kit, "feallm", **SMALL))
    projector = model.get_model().mm_projector
    assert isinstance(projector, FeallmProjector) and model.config.mm_projector_type == "feallm"
    assert all(torch.equal(projector.mlp.state_dict()[k], v) for k, v in old_mlp.items())
    assert model.get_vision_tower()(_image(kit)).shallow
