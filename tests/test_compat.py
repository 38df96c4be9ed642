"""Each compatibility shim mends a failure that upstream LLaVA really shows here.

The same probes (one per shim, listed in PROBES) run twice: in a fresh Python with
`FEALLM_LLAVA_AUTOLOAD=0`, where upstream's code runs unshimmed and must fail exactly as
`feallm_llava.integration.compat` says it does; and in this process, shimmed, where the same calls
must succeed (or get past the point where upstream failed). A shim that the installed
versions do not need must leave upstream untouched. When an upgrade makes a needed
shim's failure go away, `test_upstream_without_shims_fails_as_known` says so.

`run_probes` is also what tests/test_patches.py runs against the patched sources.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from feallm_llava.integration import compat

ROOT = Path(__file__).resolve().parents[1]

# What upstream raises without each shim: (exception type name, text in its message).
KNOWN_FAILURES = {
    "layernorm_layers": ("ImportError", "ALL_LAYERNORM_LAYERS"),
    "open_forward": ("TypeError", "cache_position"),
    "train_sampler": ("TypeError", "_get_train_sampler() takes 1 positional argument but 2 were given"),
    "save_checkpoint_metrics": ("TypeError", "_save_checkpoint() takes 3 positional arguments but 4 were given"),
    "trainer_tokenizer": ("TypeError", "unexpected keyword argument 'tokenizer'"),
    "flash_attn_fallback": ("ImportError", "FlashAttention2 has been toggled on"),
    "quantized_loading": ("ValueError", "`quantization_config` argument at the same time"),
    # upstream: generate() dies in the worker's thread, the stream reader waits for a
    # timeout and the worker answers "NETWORK ERROR" with no cause
    "worker_generate_errors": ("Empty", ""),
    "worker_image_errors": ("UnidentifiedImageError", "cannot identify image file"),
    "datasets_namespace": ("AttributeError", "has no attribute 'Dataset'"),
    "warmup_ratio": ("ValueError", "--warmup_ratio"),
    "deepspeed_optional": ("ModuleNotFoundError", "deepspeed"),
    "qlora_training": ("ValueError", "`quantization_config` argument at the same time"),
}

# Shims whose failure needs a stack this file does not start; the test named here covers them.
COVERED_ELSEWHERE = {
    "seed_model_init": ("tests/test_train.py", "test_same_seed_gives_the_same_stage1_projector"),
    "serve_examples": ("tests/test_serve_stack.py",
                       "test_gradio_server_starts_with_feallm_example_faces_instead_of_missing_upstream_images"),
    # upstream's worker runs as __main__ and its module redirects sys.stdout when imported
    "worker_error_replies": ("tests/test_serve_load.py", "test_each_faulty_kind_is_refused_with_its_cause"),
    # acts only under `python -m llava.eval.<script>` on a machine without CUDA
    "eval_scripts_on_cpu": ("tests/test_eval_scripts.py", "test_model_vqa_loader_answers_as_our_runner_does"),
    "worker_conv_template": ("tests/test_conv_template.py", "test_model_worker_answers_in_the_trained_template"),
    "worker_context_check": ("tests/test_serve_faults.py", "test_context_check_counts_feallms_17_image_tokens"),
    # acts only in `python -m llava.serve.cli` / `llava.eval.*` (argparse of that process)
    "scripts_conv_template": ("tests/test_conv_template.py", "test_upstream_cli_prompts_in_the_trained_template"),
    # need DeepSpeed ranks: run off (FEALLM_COMPAT_SKIP) and on through the launchers
    "deepspeed_cpu_start": ("tests/test_distributed.py", "test_without_the_shim_deepspeed_training_fails_as_known"),
    "empty_param_groups": ("tests/test_distributed.py", "test_without_the_shim_deepspeed_training_fails_as_known"),
    "zero3_half_precision": ("tests/test_distributed.py", "test_without_the_shim_deepspeed_training_fails_as_known"),
    # a cost, not an error: the vmapped mask is correct, only slow
    "padded_batch_mask": ("tests/test_backend_llava.py", "test_padded_batch_builds_its_masks_without_vmap"),
}

# The attribute each shim replaces: (module, dotted attribute), for the no-op check.
TARGETS = {
    "open_forward": ("llava.model.language_model.llava_llama", "LlavaLlamaForCausalLM.forward"),
    "padded_batch_mask": ("transformers.masking_utils", "sdpa_mask"),
    "layernorm_layers": ("transformers.trainer", "ALL_LAYERNORM_LAYERS"),
    "train_sampler": ("llava.train.llava_trainer", "LLaVATrainer._get_train_sampler"),
    "save_checkpoint_metrics": ("llava.train.llava_trainer", "LLaVATrainer._save_checkpoint"),
    "trainer_tokenizer": ("llava.train.llava_trainer", "LLaVATrainer.__init__"),
    "flash_attn_fallback": ("llava.train.train", "train"),
    "seed_model_init": ("llava.train.train", "train"),
    "quantized_loading": ("llava.model.builder", "load_pretrained_model"),
    "worker_generate_errors": ("llava.model.language_model.llava_llama", "LlavaLlamaForCausalLM.generate"),
    "worker_image_errors": ("llava.mm_utils", "load_image_from_base64"),
    "worker_error_replies": ("llava.model.builder", "load_pretrained_model"),
    "eval_scripts_on_cpu": ("llava.model.builder", "load_pretrained_model"),
    "worker_conv_template": ("llava.model.builder", "load_pretrained_model"),
    "worker_context_check": ("llava.model.builder", "load_pretrained_model"),
    "scripts_conv_template": ("argparse", "ArgumentParser.parse_args"),
    "serve_examples": ("gradio", "Examples"),
    "datasets_namespace": ("transformers.trainer", "is_datasets_available"),
    "warmup_ratio": ("llava.train.train", "TrainingArguments"),
    "deepspeed_optional": ("llava.train.train", "maybe_zero_3"),
    "qlora_training": ("llava.train.train", "train"),
    "deepspeed_cpu_start": ("llava.train.train", "TrainingArguments.__post_init__"),
    "empty_param_groups": ("llava.train.llava_trainer", "LLaVATrainer.create_optimizer"),
    "zero3_half_precision": ("llava.train.llava_trainer", "LLaVATrainer.train"),
}

SHIMS = {shim.name: shim for shim in compat.SHIMS}
MISSING_DATA = "no-such-dir/feallm-probe-data.json"  # makes train() stop right after the model load


# -- the probes (run in this process and, via `python -c`, in fresh ones) -------------

def outcome(fn) -> dict:
    """{"ok": True, ...what fn returned} or {"ok": False, "type", "message", "where"}."""
    try:
        return {"ok": True, **(fn() or {})}
    except Exception as err:  # noqa: BLE001 - any failure is the outcome, recorded and asserted on
        frame = traceback.extract_tb(err.__traceback__)[-1]
        return {"ok": False, "type": type(err).__name__, "message": str(err)[:3000],
                "where": f"{frame.filename}:{frame.lineno}"}


def run_probes(kit_root: str, checkpoint: str, workdir: str, train: bool = False) -> dict[str, dict]:
    """Call upstream the way each shim's failure shows; {probe: outcome}.

    An outcome is {"ok": True, ...details} or {"ok": False, "type", "message", "where"}.
    `train=True` adds a real 2-step `python -m llava.train.train_mem` run (patched sources).
    """
    import torch

    results: dict[str, dict] = {}
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)

    def probe(name, fn):
        results[name] = outcome(fn)

    import llava

    from feallm_llava import autoload

    # which llava runs, and whether any feallm hook is armed in this process
    results["llava_file"] = {"ok": True, "path": llava.__file__,
                             "hooks_armed": sorted({*autoload._before, *autoload._after})}

    def import_train():  # upstream's trainer module imports a name transformers moved
        import llava.train.train  # noqa: F401

    probe("layernorm_layers", import_train)
    if not results["layernorm_layers"]["ok"]:
        # Only so that the probes below reach the trainer's own failures: put the name
        # where upstream looks for it (what the shim does).
        import transformers.trainer
        from transformers import pytorch_utils

        transformers.trainer.ALL_LAYERNORM_LAYERS = pytorch_utils.ALL_LAYERNORM_LAYERS
    import llava.train.train as train_module
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from llava.train.llava_trainer import LLaVATrainer

    from feallm_llava.tinykit import load_tokenizer

    tokenizer = load_tokenizer(Path(kit_root) / "tokenizer")
    torch.manual_seed(0)
    model = LlavaLlamaForCausalLM.from_pretrained(str(Path(kit_root) / "llm"), torch_dtype=torch.float32)
    model.eval()

    class ModalityDataset(torch.utils.data.Dataset):
        """Lengths as LLaVA's LazySupervisedDataset reports them (negative: text only)."""

        modality_lengths = (5, -3, 7, -2, 4, 6, -1, 8)

        def __len__(self):
            return len(self.modality_lengths)

        def __getitem__(self, i):
            return {"input_ids": torch.tensor([1, 5 + i])}

    dataset = ModalityDataset()
    args = train_module.TrainingArguments(
        output_dir=str(work / "trainer"), use_cpu=True, report_to="none", save_only_model=True,
        group_by_modality_length=True)
    trainers = []

    def make_trainer():
        trainers.append(LLaVATrainer(model=model, args=args, train_dataset=dataset, tokenizer=tokenizer))
        return {}

    probe("trainer_tokenizer", make_trainer)
    if not trainers:
        trainers.append(LLaVATrainer(model=model, args=args, train_dataset=dataset))
    trainer = trainers[0]
    # transformers >= 4.46: a forward with **kwargs gets `num_items_in_batch` and the
    # Trainer then stops dividing the loss by the accumulation steps (None: older Trainer)
    results["trainer"] = {"ok": True, "accepts_loss_kwargs": getattr(trainer, "model_accepts_loss_kwargs", None)}

    def sampler():
        picked = LLaVATrainer._get_train_sampler(trainer, dataset)
        return {"sampler": type(picked).__name__, "length": len(picked)}

    probe("train_sampler", sampler)

    def train_dataloader():  # cwd is the checkout's root: its datasets/ folder is on sys.path
        return {"batches": len(trainer.get_train_dataloader())}

    probe("datasets_namespace", train_dataloader)

    def warmup_ratio():  # what every LLaVA launcher passes
        import transformers

        parser = transformers.HfArgumentParser(train_module.TrainingArguments)
        (parsed,) = parser.parse_args_into_dataclasses(
            ["--output_dir", str(work / "warmup"), "--use_cpu", "True", "--report_to", "none",
             "--warmup_ratio", "0.03"])
        return {"warmup_steps_of_100": parsed.get_warmup_steps(100)}

    probe("warmup_ratio", warmup_ratio)

    def save_without_deepspeed():  # the copy every projector / LoRA save makes of a parameter
        from llava.train import llava_trainer

        param = torch.nn.Parameter(torch.ones(2))
        return {"copies": [train_module.maybe_zero_3(param).tolist(), llava_trainer.maybe_zero_3(param).tolist()]}

    probe("deepspeed_optional", save_without_deepspeed)

    def save_checkpoint():
        trainer._save_checkpoint(trainer.model, None)
        out = Path(args.output_dir) / f"checkpoint-{trainer.state.global_step}"
        return {"files": sorted(p.name for p in out.iterdir())}

    probe("save_checkpoint_metrics", save_checkpoint)

    ids = torch.tensor([tokenizer("USER: Please describe the expression in this face. ASSISTANT:").input_ids])

    def forward_with_cache_position():
        with torch.no_grad():
            plain = model(input_ids=ids).logits
            with_position = model(input_ids=ids, cache_position=torch.arange(ids.shape[1])).logits
            loss_ratio = None
            if results["trainer"]["accepts_loss_kwargs"] is not None:
                # num_items_in_batch twice the supervised tokens: halves the loss where it
                # reaches the loss function
                mean = model(input_ids=ids, labels=ids).loss
                items = torch.tensor(2 * (ids.shape[1] - 1))
                loss_ratio = round(float(model(input_ids=ids, labels=ids, num_items_in_batch=items).loss / mean), 4)
        generated = model.generate(ids, max_new_tokens=3, do_sample=False)
        return {"same_logits": bool(torch.equal(plain, with_position)), "generated": generated.tolist(),
                "loss_ratio": loss_ratio}

    probe("open_forward", forward_with_cache_position)

    def generate_error_reaches_reader():
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=2)
        raised = None
        try:  # a bad sampling parameter: generate() fails, as in the worker's thread
            model.generate(ids, streamer=streamer, do_sample=True, temperature=-1.0, max_new_tokens=2)
        except ValueError as err:
            raised = type(err).__name__
        text = "".join(streamer)  # what the worker's reader gets
        return {"generate_raised": raised, "text": text}

    probe("worker_generate_errors", generate_error_reaches_reader)

    def corrupt_upload():
        import base64

        from llava.mm_utils import load_image_from_base64

        load_image_from_base64(base64.b64encode(b"this is not an image").decode())
        return {}

    probe("worker_image_errors", corrupt_upload)

    kit_args = ["--model_name_or_path", str(Path(kit_root) / "llm"), "--version", "v1",
                "--vision_tower", str(Path(kit_root) / "clip"), "--mm_projector_type", "mlp2x_gelu",
                "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False",
                "--mm_use_im_patch_token", "False", "--image_aspect_ratio", "pad", "--lazy_preprocess", "True",
                "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
                "--model_max_length", "512", "--dataloader_num_workers", "0", "--report_to", "none",
                "--use_cpu", "True", "--seed", "0", "--data_seed", "0", "--logging_steps", "1"]

    def run_train_mem(extra):
        import runpy

        saved = sys.argv
        sys.argv = ["llava.train.train_mem", *kit_args, *extra]
        try:
            runpy.run_module("llava.train.train_mem", run_name="__main__", alter_sys=True)
        finally:
            sys.argv = saved

    def train_mem_until_data():
        # train_mem asks for flash_attention_2: upstream fails at the model load; mended,
        # the model loads with sdpa and train() stops at the missing data file.
        run_train_mem(["--data_path", str(work / MISSING_DATA), "--image_folder", str(work),
                       "--output_dir", str(work / "flash-probe"), "--max_steps", "1"])
        return {}

    probe("flash_attn_fallback", train_mem_until_data)
    probe("qlora_training", lambda: qlora_probe(kit_root, workdir))

    from llava.model.builder import load_pretrained_model

    def load_4bit():
        _, quantized, _, _ = load_pretrained_model(checkpoint, None, Path(checkpoint).name, load_4bit=True,
                                                   device="cpu")
        kinds = {name: type(module).__name__ for name, module in quantized.named_modules()
                 if isinstance(module, torch.nn.Linear)}
        out = quantized.generate(ids, max_new_tokens=2, do_sample=False)
        return {"linear_kinds": kinds, "generated": out.tolist()}

    probe("quantized_loading", load_4bit)

    def missing_path():
        load_pretrained_model(str(work / "no-such-llava-checkpoint"), None, "no-such-llava-checkpoint", device="cpu")
        return {}

    probe("quantized_loading/missing_path", missing_path)

    if train:
        from feallm_llava.tinykit import write_sample_data

        data = write_sample_data(work / "data", n=8)
        out = work / "train-run"

        def full_finetune():
            # full finetune (not --tune_mm_mlp_adapter) saving at every step: the Trainer's
            # sampler, its checkpoint save, the tokenizer argument and forward's keywords
            run_train_mem(["--data_path", str(data / "finetune.json"), "--image_folder", str(data / "images"),
                           "--output_dir", str(out), "--max_steps", "2", "--learning_rate", "1e-3",
                           "--save_strategy", "steps", "--save_steps", "1"])
            state = json.loads((out / "trainer_state.json").read_text())
            return {"losses": [h["loss"] for h in state["log_history"] if "loss" in h],
                    "files": sorted(p.name for p in out.iterdir())}

        probe("train_mem", full_finetune)
    return results


def qlora_probe(kit_root: str, workdir: str) -> dict:
    """Upstream's train() with `--bits 4 --bf16 True --lora_enable True` on the tiny kit, then
    its loader on the LoRA checkpoint it saved; what was quantized, kept and saved.

    The Trainer is a stand-in that records the model it is handed and trains nothing
    (tests/test_qlora.py trains); everything else is upstream's: the quantized load,
    `prepare_model_for_kbit_training`, LoRA, the projector and its casts, the save of the
    adapter, `non_lora_trainables.bin` and `config.json`. Also run by tests/test_patches.py.
    """
    import llava.train.train as train_module
    import torch
    from llava.model.builder import load_pretrained_model

    kit, out = Path(kit_root), Path(workdir) / "llava-qlora-probe-lora"
    seen: dict[str, list[str]] = {}

    def part(name: str) -> str | None:
        return ("projector" if ".mm_projector." in name else "tower" if ".vision_tower." in name
                else "lm_head" if name.endswith("lm_head") else "llm" if ".layers." in name else None)

    class StandIn:
        def __init__(self, model=None, **_kwargs):
            kinds: dict[str, set] = {}
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and ".lora_" not in name and part(name):
                    kinds.setdefault(part(name), set()).add(f"{type(module).__name__}:{module.weight.dtype}")
            seen.update({key: sorted(value) for key, value in kinds.items()})

        def train(self, resume_from_checkpoint=None):
            pass

        def save_state(self):
            pass

    argv = ["llava.train.train", "--model_name_or_path", str(kit / "llm"), "--version", "v1",
            "--vision_tower", str(kit / "clip"), "--mm_projector_type", "mlp2x_gelu",
            "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
            "--bits", "4", "--bf16", "True", "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8",
            "--mm_projector_lr", "2e-5", "--data_path", str(Path(workdir) / MISSING_DATA),
            "--output_dir", str(out), "--use_cpu", "True", "--report_to", "none", "--seed", "0"]
    saved = (train_module.LLaVATrainer, train_module.make_supervised_data_module, sys.argv)
    environ = dict(os.environ)  # --bf16 leaves ACCELERATE_MIXED_PRECISION=bf16 for later runs
    train_module.LLaVATrainer = StandIn  # train() looks both up when it gets there
    train_module.make_supervised_data_module = lambda tokenizer, data_args: {}
    sys.argv = argv
    try:
        train_module.train(attn_implementation="sdpa")
    finally:
        train_module.LLaVATrainer, train_module.make_supervised_data_module, sys.argv = saved
        os.environ.clear()
        os.environ.update(environ)
    config = json.loads((out / "config.json").read_text())
    non_lora = torch.load(out / "non_lora_trainables.bin", weights_only=True)
    tokenizer, model, _, _ = load_pretrained_model(str(out), str(kit / "llm"), out.name, device="cpu",
                                                   device_map="cpu")
    ids = torch.tensor([tokenizer("USER: Please describe the expression in this face. ASSISTANT:").input_ids])
    generated = model.generate(ids, max_new_tokens=2, do_sample=False)
    return {"linear": seen, "config_quantization": "quantization_config" in config,
            "non_lora": sorted({f"{'mm_projector' if '.mm_projector.' in k else k}:{v.dtype}"
                                for k, v in non_lora.items()}),
            "generated": generated.tolist()}


def attribute(module_name: str, dotted: str):
    obj = sys.modules[module_name]
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def register_and_compare(names: list[str]) -> dict[str, dict]:
    """Import each shim's target, call register(), report which attributes it replaced."""
    import importlib
    import importlib.util

    import feallm_llava
    from feallm_llava.integration.marks import is_marked

    before = {}
    for name in names:
        module_name, dotted = TARGETS[name]
        if module_name not in sys.modules and importlib.util.find_spec(module_name.split(".")[0]) is None:
            continue
        importlib.import_module(module_name)
        before[name] = attribute(module_name, dotted)
    feallm_llava.register()
    report = {}
    for name, old in before.items():
        new = attribute(*TARGETS[name])
        report[name] = {"unchanged": new is old, "marked": is_marked(new, name)}
    return report


def probe_in_fresh_python(kit_root, checkpoint, workdir, *, pythonpath: list[str], train=False,
                          compare: list[str] | None = None) -> dict:
    """run_probes in a new interpreter with FEALLM_LLAVA_AUTOLOAD=0: upstream as installed
    (or as found first on `pythonpath`), no shim armed; then, with `compare`,
    register_and_compare on those shims."""
    out = Path(workdir) / "probes.json"
    code = (
        "import json, sys\n"
        "from tests.test_compat import run_probes, register_and_compare\n"
        f"results = run_probes({str(kit_root)!r}, {str(checkpoint)!r}, {str(workdir)!r}, train={train!r})\n"
        + (f"results['register'] = register_and_compare({compare!r})\n" if compare is not None else "")
        + f"open({str(out)!r}, 'w').write(json.dumps(results))\n"
    )
    env = {**os.environ, "FEALLM_LLAVA_AUTOLOAD": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join([*pythonpath, str(ROOT)])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(ROOT), capture_output=True,
                          text=True, timeout=1200, check=False)
    assert proc.returncode == 0 and out.exists(), (
        f"probe process failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


# -- fixtures -------------------------------------------------------------------------

def build_probe_checkpoint(kit, tmp_path_factory) -> Path:
    """A full tiny LLaVA checkpoint with upstream's mlp2x_gelu projector (built once per run)."""
    from feallm_llava.tinykit import build_llava

    return build_llava(tmp_path_factory.getbasetemp() / "llava-tiny-mlp2x-probes", kit, projector_type="mlp2x_gelu")


@pytest.fixture(scope="module")
def probe_checkpoint(kit, tmp_path_factory):
    return build_probe_checkpoint(kit, tmp_path_factory)


@pytest.fixture(scope="module")
def upstream(kit, probe_checkpoint, tmp_path_factory):
    """Probe outcomes of unshimmed upstream (fresh Python, autoload off), then register()."""
    return probe_in_fresh_python(kit.root, probe_checkpoint, tmp_path_factory.mktemp("upstream"),
                                 pythonpath=[], compare=sorted(TARGETS))


@pytest.fixture(scope="module")
def shimmed(kit, probe_checkpoint, tmp_path_factory):
    """Probe outcomes in this process, with the shims registered."""
    import feallm_llava

    feallm_llava.register()
    return run_probes(str(kit.root), str(probe_checkpoint), str(tmp_path_factory.mktemp("shimmed")))


def needed(name: str) -> bool:
    return SHIMS[name].needed()


PROBED = sorted(KNOWN_FAILURES)


# -- tests ----------------------------------------------------------------------------

def test_every_shim_has_a_probe_here_or_a_named_test_elsewhere():
    for name in SHIMS:
        assert name in TARGETS, f"compat shim {name!r}: add its target attribute to TARGETS"
        if name in COVERED_ELSEWHERE:
            path, test = COVERED_ELSEWHERE[name]
            assert f"def {test}(" in (ROOT / path).read_text(), f"{name}: {path}::{test} is gone"
        else:
            assert name in KNOWN_FAILURES, f"compat shim {name!r} has no probe in tests/test_compat.py"


def test_unshimmed_process_runs_the_installed_upstream(upstream):
    import llava

    assert upstream["llava_file"] == {"ok": True, "path": llava.__file__, "hooks_armed": []}


@pytest.mark.parametrize("name", PROBED)
def test_upstream_without_shims_fails_as_known(name, upstream):
    if not needed(name):
        pytest.skip(f"{name}: not needed here ({SHIMS[name].versions}); see the no-op test")
    outcome = upstream[name]
    kind, text = KNOWN_FAILURES[name]
    if name == "quantized_loading" and outcome.get("type") != kind:
        pytest.skip(f"4-bit load fails otherwise on this machine (bitsandbytes?): {outcome}")
    assert not outcome["ok"], (
        f"upstream no longer fails without shim {name!r} ({SHIMS[name].breaks}): "
        f"make its needed() return False for this version. Outcome: {outcome}")
    assert outcome["type"] == kind and text in outcome["message"], outcome


@pytest.mark.parametrize("name", PROBED)
def test_shim_mends_the_failure(name, shimmed):
    outcome = shimmed[name]
    if name == "quantized_loading" and not outcome["ok"] and "bitsandbytes" in (
            outcome["message"] + outcome["where"]).lower():
        pytest.skip(f"bitsandbytes cannot quantize on this machine: {outcome['message'][:300]}")
    if name == "qlora_training" and not outcome["ok"] and "bitsandbytes" in (
            outcome["message"] + outcome["where"]).lower():
        pytest.skip(f"bitsandbytes cannot quantize on this machine: {outcome['message'][:300]}")
    if name == "flash_attn_fallback":
        if not needed(name):
            pytest.skip("flash-attn and CUDA are present: train_mem really trains with flash-attention 2")
        # past the model load, train() stops where the probe wants it: the missing data
        assert outcome["type"] == "FileNotFoundError" and MISSING_DATA in outcome["message"], outcome
        return
    if name == "worker_generate_errors":
        # the reader gets the cause at once, not a timeout
        assert outcome["type"] == "GenerationError" and "temperature" in outcome["message"], outcome
        return
    if name == "worker_image_errors":
        assert outcome["type"] == "ImageError" and "request image" in outcome["message"], outcome
        assert "_io.BytesIO" not in outcome["message"]
        return
    assert outcome["ok"], outcome
    if name == "open_forward":
        assert outcome["same_logits"] and len(outcome["generated"][0]) == 3
    elif name == "train_sampler":  # LLaVA's own modality-grouped sampler, over the whole set
        assert outcome == {"ok": True, "sampler": "LengthGroupedSampler", "length": 8}
    elif name == "datasets_namespace":
        assert outcome == {"ok": True, "batches": 1}
    elif name == "warmup_ratio":  # 3 % of 100 steps
        assert outcome == {"ok": True, "warmup_steps_of_100": 3}
    elif name == "deepspeed_optional":
        assert outcome == {"ok": True, "copies": [[1.0, 1.0], [1.0, 1.0]]}
    elif name == "save_checkpoint_metrics":
        assert "model.safetensors" in outcome["files"] and "config.json" in outcome["files"]
    elif name == "quantized_loading":
        kinds = outcome["linear_kinds"]
        assert kinds["model.layers.0.self_attn.q_proj"] == "Linear4bit"
        assert kinds["model.mm_projector.0"] == kinds["model.mm_projector.2"] == kinds["lm_head"] == "Linear"
        assert len(outcome["generated"][0]) == 2
    elif name == "qlora_training":
        assert_qlora_mended(outcome)


def assert_qlora_mended(outcome: dict) -> None:
    """`--bits 4 --bf16`: the LLM in 4-bit; projector (float32), tower and lm_head unquantized;
    a checkpoint whose config names no quantization, with a float32 projector, that loads."""
    assert outcome["ok"], outcome
    linear = outcome["linear"]
    assert linear["llm"] == ["Linear4bit:torch.uint8"], linear
    assert linear["projector"] == ["Linear:torch.float32"], linear  # upstream: cast to bf16
    assert all(kind.startswith("Linear:torch.") for kind in linear["tower"] + linear["lm_head"]), linear
    assert not outcome["config_quantization"]
    assert outcome["non_lora"] == ["mm_projector:torch.float32"], outcome["non_lora"]
    assert len(outcome["generated"][0]) == 2


def loss_normalisation_agrees(outcomes: dict) -> bool:
    """The Trainer divides by the accumulation steps exactly when forward ignores num_items_in_batch."""
    accepts, ratio = outcomes["trainer"]["accepts_loss_kwargs"], outcomes["open_forward"]["loss_ratio"]
    return ratio is None if accepts is None else ratio == (0.5 if accepts else 1.0)


def test_shimmed_forward_and_trainer_agree_on_loss_normalisation(shimmed):
    assert loss_normalisation_agrees(shimmed), (shimmed["trainer"], shimmed["open_forward"])


def test_missing_local_checkpoint_is_named_not_fetched(upstream, shimmed):
    assert not upstream["quantized_loading/missing_path"]["ok"]  # upstream: a hub-style error
    outcome = shimmed["quantized_loading/missing_path"]
    assert outcome["type"] == "FileNotFoundError" and "no-such-llava-checkpoint" in outcome["message"], outcome


def test_unneeded_shims_leave_upstream_untouched(upstream):
    report = upstream["register"]
    idle = [name for name in report if not needed(name)]
    for name in idle:
        assert report[name] == {"unchanged": True, "marked": False}, f"{name} is not needed but changed upstream"
    # register() did act in that process: every needed shim applied after import marks its target
    for name, seen in report.items():
        if needed(name) and not SHIMS[name].before:
            assert seen["marked"], f"{name} is needed but register() left {TARGETS[name]} as it was"
