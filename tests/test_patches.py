"""patches/*.patch apply to the llava-torch 1.2.2.post1 sources and make them work unshimmed.

The installed llava package is copied to a temporary directory; every patch must apply
there on its own (patch and git apply, no fuzz, no offset), and all of them in order.
The patched copy is then imported first on PYTHONPATH in a fresh Python with
`FEALLM_LLAVA_AUTOLOAD=0` (no runtime shim armed) and put through the same probes as
tests/test_compat.py, plus a real two-step `python -m llava.train.train_mem` run.

Patches 0008-0011 mend failures that this stack does not show by itself (transformers
5.x, a machine without deepspeed, two launches of one run): `simulate` provokes each of
them here, in copies patched with the whole series and with all patches but that one.
0012 (`--bits 4`, QLoRA) is proven the same way: its failure shows here as it is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_compat import (
    assert_qlora_mended,
    build_probe_checkpoint,
    loss_normalisation_agrees,
    probe_in_fresh_python,
    qlora_probe,
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


def apply_in_order(root: Path, patches: list[Path]) -> Path:
    for patch in patches:
        proc = run(["patch", "-p1", "--forward", "--fuzz=0", "--no-backup-if-mismatch"], root, stdin=patch)
        assert proc.returncode == 0, f"{patch.name} did not apply in order:\n{proc.stdout}{proc.stderr}"
    return root


@pytest.fixture(scope="module")
def patched(tmp_path_factory) -> Path:
    """A copy with every patch applied in order by GNU patch."""
    return apply_in_order(copy_llava(tmp_path_factory.mktemp("patched")), PATCHES)


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
    from feallm_llava.integration.compat.versions import flash_attn_available

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


def test_patched_trainer_does_not_take_a_datasets_folder_for_the_library(probes):
    # the probe process runs in the checkout's root, whose datasets/ folder is on sys.path
    assert probes["datasets_namespace"] == {"ok": True, "batches": 1}


def test_patched_training_arguments_take_warmup_ratio(probes):
    assert probes["warmup_ratio"] == {"ok": True, "warmup_steps_of_100": 3}  # 3 % of 100 steps


def test_patched_maybe_zero_3_copies_a_parameter(probes):
    assert probes["deepspeed_optional"] == {"ok": True, "copies": [[1.0, 1.0], [1.0, 1.0]]}


# -- patches 0008-0012: each one is what mends its failure -----------------------------

MENDS = {"0008": "datasets_namespace", "0009": "warmup_ratio", "0010": "deepspeed_optional",
         "0011": "seed_model_init", "0012": "qlora_training"}  # patch number: the runtime shim it replaces


def simulate(kit_root: str, workdir: str) -> dict[str, dict]:
    """Provoke the failures of patches 0008-0012 on this stack; {name: outcome}.

    Runs in a fresh Python (see `simulate_in_fresh_python`), in this order because the
    first sets up transformers before llava is imported and the last removes deepspeed:

    - `datasets_namespace`: transformers.trainer is made to see `datasets` as 5.x does
      (find_spec alone, which finds the checkout's datasets/ folder), then a train
      dataloader is built.
    - `warmup_ratio`: `--warmup_ratio 0.03` parsed into LLaVA's TrainingArguments (fails
      unpatched on 5.x only: 4.x still has the field).
    - `seed_model_init`: upstream's train() run up to the Trainer three times in one
      process, the global RNG left in another state before each, with --seed 7, 7, 8;
      digests of the initial projector and LoRA weights.
    - `qlora_training`: upstream's train() with `--bits 4 --bf16 True --lora_enable True`
      (a stand-in Trainer), its LoRA save and its loader (tests/test_compat.py's probe).
    - `deepspeed_optional`: deepspeed made unimportable, as on a machine without it,
      then `maybe_zero_3` of a plain parameter in train.py and llava_trainer.py
      (`deepspeed_optional/partitioned`: of a parameter with a `ds_id`).
    """
    import hashlib
    import importlib
    import importlib.util

    import torch

    results: dict[str, dict] = {}
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)

    from tests.test_compat import outcome

    def attempt(name, fn):
        results[name] = outcome(fn)

    import llava
    import transformers
    import transformers.trainer

    from feallm_llava import autoload

    results["llava_file"] = {"ok": True, "path": llava.__file__,
                             "hooks_armed": sorted({*autoload._before, *autoload._after})}

    spec = importlib.util.find_spec("datasets")
    results["datasets_found"] = {"ok": spec is not None, "origin": spec and spec.origin,
                                 "locations": spec and list(spec.submodule_search_locations or [])}
    # what transformers >= 5.0 concludes from find_spec("datasets") alone
    transformers.trainer.is_datasets_available = lambda: True
    transformers.trainer.datasets = importlib.import_module("datasets")

    import llava.train.train as train_module
    from llava.train import llava_trainer

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"x": torch.tensor([float(i), 1.0])}

    def dataloader():
        args = train_module.TrainingArguments(output_dir=str(work / "dataloader"), use_cpu=True, report_to="none",
                                              per_device_train_batch_size=2)
        trainer = llava_trainer.LLaVATrainer(model=torch.nn.Linear(2, 2), args=args, train_dataset=Pairs())
        return {"batches": len(trainer.get_train_dataloader())}

    attempt("datasets_namespace", dataloader)

    def warmup_ratio():
        parser = transformers.HfArgumentParser(train_module.TrainingArguments)
        (parsed,) = parser.parse_args_into_dataclasses(
            ["--output_dir", str(work / "warmup"), "--use_cpu", "True", "--report_to", "none",
             "--warmup_ratio", "0.03"])
        return {"warmup_steps_of_100": parsed.get_warmup_steps(100)}

    attempt("warmup_ratio", warmup_ratio)

    class Built(Exception):
        """Raised where train() hands the built model to the Trainer."""

    def digest(state: dict, part: str) -> list:
        keys = sorted(k for k in state if part in k)
        sha = hashlib.sha256()
        for key in keys:
            sha.update(key.encode() + state[key].float().numpy().tobytes())
        return [len(keys), sha.hexdigest()[:16]]

    def seeded_builds():
        built = []

        class Capture:
            def __init__(self, model=None, **_kwargs):
                built.append({k: v.detach().cpu().clone() for k, v in model.named_parameters()})
                raise Built

        kit = Path(kit_root)
        argv = ["llava.train.train", "--model_name_or_path", str(kit / "llm"), "--version", "v1",
                "--vision_tower", str(kit / "clip"), "--mm_projector_type", "mlp2x_gelu",
                "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False",
                "--mm_use_im_patch_token", "False", "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8",
                "--data_path", str(work / "unused.json"), "--output_dir", str(work / "seeded"),
                "--use_cpu", "True", "--report_to", "none"]
        saved = (train_module.LLaVATrainer, train_module.make_supervised_data_module, sys.argv)
        train_module.LLaVATrainer = Capture  # train() looks both up when it gets there
        train_module.make_supervised_data_module = lambda tokenizer, data_args: {}
        runs = []
        try:
            for seed, state in ((7, 1), (7, 2), (8, 1)):
                torch.manual_seed(state)  # the RNG as another launch leaves it
                sys.argv = [*argv, "--seed", str(seed)]
                try:
                    train_module.train(attn_implementation="sdpa")
                except Built:
                    pass
                runs.append({"seed": seed, "projector": digest(built[-1], "mm_projector."),
                             "lora": digest(built[-1], "lora_")})
        finally:
            train_module.LLaVATrainer, train_module.make_supervised_data_module, sys.argv = saved
        return {"runs": runs}

    attempt("seed_model_init", seeded_builds)
    attempt("qlora_training", lambda: qlora_probe(kit_root, workdir))

    for name in [m for m in sys.modules if m == "deepspeed" or m.startswith("deepspeed.")]:
        del sys.modules[name]
    sys.modules["deepspeed"] = None  # `import deepspeed` now fails, as without the package

    def copies_without_deepspeed():
        param = torch.nn.Parameter(torch.ones(2))
        copies = [train_module.maybe_zero_3(param), llava_trainer.maybe_zero_3(param, ignore_status=True)]
        return {"copies": [c.tolist() for c in copies],
                "detached": all(not c.requires_grad and c.data_ptr() != param.data_ptr() for c in copies)}

    attempt("deepspeed_optional", copies_without_deepspeed)

    def partitioned():
        param = torch.nn.Parameter(torch.ones(2))
        param.ds_id = 0  # as ZeRO-3 marks the parameters it partitioned
        train_module.maybe_zero_3(param)

    attempt("deepspeed_optional/partitioned", partitioned)
    return results


def simulate_in_fresh_python(kit_root, workdir: Path, pythonpath: list[str]) -> dict:
    """`simulate` in a new interpreter run in the checkout's root, with FEALLM_LLAVA_AUTOLOAD=0."""
    out = Path(workdir) / "simulated.json"
    code = ("import json\n"
            "from tests.test_patches import simulate\n"
            f"results = simulate({str(kit_root)!r}, {str(workdir)!r})\n"
            f"open({str(out)!r}, 'w').write(json.dumps(results))\n")
    env = {**os.environ, "FEALLM_LLAVA_AUTOLOAD": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join([*pythonpath, str(ROOT)])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(ROOT), capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0 and out.exists(), (
        f"simulation failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def simulated(kit, patched, tmp_path_factory) -> dict[str, dict]:
    """{"series": outcomes with every patch, "0008": outcomes with all but 0008, ...}."""
    outcomes = {"series": simulate_in_fresh_python(kit.root, tmp_path_factory.mktemp("simulated-series"),
                                                   [str(patched)])}
    for number in MENDS:
        others = [p for p in PATCHES if not p.name.startswith(f"{number}-")]
        assert len(others) == len(PATCHES) - 1, f"no patch {number}"
        root = apply_in_order(copy_llava(tmp_path_factory.mktemp(f"without-{number}")), others)
        outcomes[number] = simulate_in_fresh_python(kit.root, tmp_path_factory.mktemp(f"simulated-{number}"),
                                                    [str(root)])
        assert outcomes[number]["llava_file"]["path"] == str(root / "llava" / "__init__.py")
    return outcomes


def test_simulation_runs_the_patched_copy_with_no_shim(simulated, patched):
    assert simulated["series"]["llava_file"] == {"ok": True, "path": str(patched / "llava" / "__init__.py"),
                                                 "hooks_armed": []}
    # the checkout's datasets/ folder is what `import datasets` finds here: a namespace package
    found = simulated["series"]["datasets_found"]
    assert found["ok"] and found["origin"] in (None, "namespace"), found
    assert str(ROOT / "datasets") in found["locations"], found


@pytest.mark.parametrize("number", sorted(MENDS))
def test_patch_is_what_mends_its_failure(number, simulated):
    name = MENDS[number]
    mended, unmended = simulated["series"][name], simulated[number][name]
    if name == "datasets_namespace":
        assert mended == {"ok": True, "batches": 2}, mended
        assert unmended["type"] == "AttributeError" and "has no attribute 'Dataset'" in unmended["message"], unmended
    elif name == "warmup_ratio":
        import dataclasses

        import transformers

        assert mended == {"ok": True, "warmup_steps_of_100": 3}, mended
        if "warmup_ratio" in {f.name for f in dataclasses.fields(transformers.TrainingArguments)}:
            assert unmended == mended  # 4.x: the patch leaves TrainingArguments as it was
        else:
            assert unmended["type"] == "ValueError" and "--warmup_ratio" in unmended["message"], unmended
    elif name == "deepspeed_optional":
        assert mended == {"ok": True, "copies": [[1.0, 1.0], [1.0, 1.0]], "detached": True}, mended
        assert unmended["type"] == "ModuleNotFoundError" and "deepspeed" in unmended["message"], unmended
        # a ZeRO-3 partitioned parameter still goes to deepspeed to be gathered
        partitioned = simulated["series"]["deepspeed_optional/partitioned"]
        assert partitioned["type"] == "ModuleNotFoundError" and "deepspeed" in partitioned["message"], partitioned
    elif name == "seed_model_init":
        assert mended["ok"] and unmended["ok"], (mended, unmended)
        first, again, other = mended["runs"]
        assert first["projector"][0] == 4 and first["lora"][0] > 0, first  # two Linears; LoRA A and B
        assert (first["projector"], first["lora"]) == (again["projector"], again["lora"])
        assert first["projector"] != other["projector"] and first["lora"] != other["lora"]
        # upstream: the weights follow whatever the RNG held, and --seed has no say in them
        first, again, other = unmended["runs"]
        assert first["projector"] != again["projector"] and first["lora"] != again["lora"]
        assert (first["projector"], first["lora"]) == (other["projector"], other["lora"])
    elif name == "qlora_training":
        if not mended["ok"] and "bitsandbytes" in (mended["message"] + mended["where"]).lower():
            pytest.skip(f"bitsandbytes cannot quantize on this machine: {mended['message'][:300]}")
        assert_qlora_mended(mended)  # the LLM in 4-bit, the projector in float32, a checkpoint that loads
        assert unmended["type"] == "ValueError" and "`quantization_config` argument at the same time" in (
            unmended["message"]), unmended
    else:
        raise AssertionError(f"no check for {name}")


def test_patched_copy_trains_lora_on_two_cpu_ranks_under_zero3_in_bf16(kit, patched, tmp_path):
    # 0013-0015 (and the rest): upstream's stage 2 (LoRA, --mm_projector_lr, bf16, ZeRO-3) on
    # 2 CPU ranks with no runtime shim, upstream's own mlp2x_gelu projector
    from feallm_llava.tinykit import write_sample_data

    write_sample_data(tmp_path / "data")
    env = {**os.environ, "FEALLM_LLAVA_AUTOLOAD": "0", "PYTHONPATH": str(patched), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "--module", "llava.train.train_mem",
           "--deepspeed", str(ROOT / "launch" / "zero3.json"), "--version", "v1",
           "--lora_enable", "True", "--lora_r", "16", "--lora_alpha", "32", "--mm_projector_lr", "2e-5",
           "--model_name_or_path", str(kit.llm), "--vision_tower", str(kit.clip),
           "--data_path", str(tmp_path / "data" / "finetune.json"), "--image_folder", str(tmp_path / "data" / "images"),
           "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2", "--image_aspect_ratio", "pad",
           "--bf16", "True", "--use_cpu", "True", "--tf32", "False", "--ddp_backend", "gloo",
           "--output_dir", str(tmp_path / "llava-patched-lora"), "--per_device_train_batch_size", "2",
           "--max_steps", "2", "--save_strategy", "no", "--model_max_length", "512", "--report_to", "none",
           "--dataloader_num_workers", "0", "--lazy_preprocess", "True"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert (tmp_path / "llava-patched-lora" / "non_lora_trainables.bin").is_file()
