"""The paper-scale launchers in launch/: syntax, the commands they print, and that every
flag they give upstream's train script is one its argument parser accepts."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from feallm_llava.testing.fake_openai import start_fake_openai

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TRAIN_MODULE = "llava.train.train_mem"
# Launcher settings of the caller's shell that would change what the scripts print.
LAUNCHER_ENV = ("CUDA_VISIBLE_DEVICES", "HOSTFILE", "NUM_GPUS", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "DEVICE", "LAUNCHER", "NNODES", "NODE_RANK", "DS_CONFIG", "TORCHRUN", "OMP_NUM_THREADS",
                "GLOBAL_BATCH", "PER_DEVICE_BATCH", "ZERO", "EXTRA_ARGS", "FEALLM_ARGS", "MODEL", "LR",
                "PROJ_LR", "LORA_R", "LORA_ALPHA", "EPOCHS", "DATA_PATH", "IMAGE_FOLDER", "OUTPUT_DIR",
                "DEEPSPEED", "GPU_LIST", "BENCHES", "MODEL_PATH", "MODEL_BASE", "OPENAI_MODEL", "OUT")


def run_script(name: str, dry: bool = True, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    full.update(PY=sys.executable, **env)
    if dry:
        full["DRY_RUN"] = "1"
    return subprocess.run(["bash", str(LAUNCH / name)], env=full, capture_output=True, text=True, timeout=120,
                          check=False)


def printed_commands(proc: subprocess.CompletedProcess) -> list[list[str]]:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def train_command(name: str, **env: str) -> tuple[list[str], list[str]]:
    """(launcher part, train-script arguments) of the one command a dry run prints."""
    (cmd,) = printed_commands(run_script(name, **env))
    cut = cmd.index(TRAIN_MODULE)
    return cmd[:cut + 1], cmd[cut + 1:]


def flag(args: list[str], name: str) -> str:
    """The value after `name`; the last occurrence wins, as in argparse."""
    idx = len(args) - 1 - args[::-1].index(name)
    return args[idx + 1]


def test_every_launcher_passes_bash_syntax_check():
    scripts = sorted(LAUNCH.glob("*.sh"))
    assert {"pretrain.sh", "finetune_lora.sh", "eval.sh", "gpu_smoke.sh"} <= {s.name for s in scripts}
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"


def test_launchers_run_under_strict_mode():
    for name in ("pretrain.sh", "finetune_lora.sh", "eval.sh", "gpu_smoke.sh"):
        assert "set -euo pipefail" in (LAUNCH / name).read_text(), name


def test_zero_configs_are_valid_deepspeed_json_with_their_stage():
    zero2 = json.loads((LAUNCH / "zero2.json").read_text())
    zero3 = json.loads((LAUNCH / "zero3.json").read_text())
    assert zero2["zero_optimization"]["stage"] == 2 and zero3["zero_optimization"]["stage"] == 3
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    for cfg in (zero2, zero3):
        # sizes and precision come from the HF Trainer's flags, so one file serves any GPU count
        assert cfg["bf16"]["enabled"] == cfg["fp16"]["enabled"] == "auto"
        assert cfg["train_micro_batch_size_per_gpu"] == cfg["gradient_accumulation_steps"] == "auto"


def test_pretrain_prints_the_paper_stage1_command():
    launcher, args = train_command("pretrain.sh", NUM_GPUS="2")
    assert launcher[-4:] == ["--num_gpus", "2", "--module", TRAIN_MODULE]
    assert flag(args, "--deepspeed") == str(LAUNCH / "zero2.json")
    assert flag(args, "--mm_projector_type") == "feallm"
    assert flag(args, "--tune_mm_mlp_adapter") == "True" and flag(args, "--version") == "plain"
    assert flag(args, "--model_name_or_path") == "lmsys/vicuna-7b-v1.5"
    assert flag(args, "--vision_tower") == "openai/clip-vit-large-patch14-336"
    assert flag(args, "--mm_vision_select_layer") == "-2"
    i = args.index("--mm_feallm_shallow_layers")
    assert args[i + 1:i + 5] == ["3", "8", "13", "18"] and args[i + 5].startswith("--")
    assert flag(args, "--mm_feallm_lca_channels") == "64"
    assert flag(args, "--learning_rate") == "1e-3" and flag(args, "--num_train_epochs") == "1"
    assert flag(args, "--bf16") == flag(args, "--tf32") == flag(args, "--gradient_checkpointing") == "True"
    assert flag(args, "--model_max_length") == "2048" and flag(args, "--report_to") == "none"
    assert "--lora_enable" not in args


def test_finetune_prints_the_paper_stage2_command(tmp_path):
    launcher, args = train_command("finetune_lora.sh", NUM_GPUS="2", STAGE1_DIR=str(tmp_path / "s1"))
    assert launcher[-4:] == ["--num_gpus", "2", "--module", TRAIN_MODULE]
    assert flag(args, "--deepspeed") == str(LAUNCH / "zero3.json")
    assert flag(args, "--lora_enable") == "True"
    assert flag(args, "--lora_r") == "128" and flag(args, "--lora_alpha") == "256"
    assert flag(args, "--learning_rate") == "2e-4" and flag(args, "--mm_projector_lr") == "2e-5"
    assert flag(args, "--pretrain_mm_mlp_adapter") == str(tmp_path / "s1" / "mm_projector.bin")
    assert flag(args, "--version") == "v1" and flag(args, "--group_by_modality_length") == "True"
    assert flag(args, "--mm_projector_type") == "feallm" and "--tune_mm_mlp_adapter" not in args
    assert Path(flag(args, "--output_dir")).name == "feallm-llava-v1.5-7b-lora"  # 'llava' + 'lora': loadable


@pytest.mark.parametrize("script,gpus,per_device,accum,global_batch", [
    ("pretrain.sh", "1", 16, 4, 64),
    ("pretrain.sh", "2", 16, 2, 64),
    ("pretrain.sh", "8", 8, 1, 64),
    ("finetune_lora.sh", "2", 8, 1, 16),
    ("finetune_lora.sh", "8", 2, 1, 16),
])
def test_global_batch_stays_the_papers_for_any_gpu_count(script, gpus, per_device, accum, global_batch):
    _, args = train_command(script, NUM_GPUS=gpus)
    got = int(flag(args, "--per_device_train_batch_size")), int(flag(args, "--gradient_accumulation_steps"))
    assert got == (per_device, accum)
    assert got[0] * got[1] * int(gpus) == global_batch


def test_per_device_batch_override_moves_the_rest_into_accumulation():
    _, args = train_command("pretrain.sh", NUM_GPUS="2", PER_DEVICE_BATCH="4")
    assert (flag(args, "--per_device_train_batch_size"), flag(args, "--gradient_accumulation_steps")) == ("4", "8")


def test_global_batch_not_divisible_by_the_gpus_is_refused_naming_both():
    proc = run_script("pretrain.sh", NUM_GPUS="3")
    assert proc.returncode == 2 and "GLOBAL_BATCH=64" in proc.stderr and "3 GPUs" in proc.stderr
    proc = run_script("finetune_lora.sh", NUM_GPUS="2", PER_DEVICE_BATCH="3")
    assert proc.returncode == 2 and "PER_DEVICE_BATCH=3" in proc.stderr


def test_zero_env_selects_the_deepspeed_config():
    _, args = train_command("finetune_lora.sh", NUM_GPUS="2", ZERO="2")
    assert flag(args, "--deepspeed") == str(LAUNCH / "zero2.json")
    _, args = train_command("pretrain.sh", NUM_GPUS="2", ZERO="3")
    assert flag(args, "--deepspeed") == str(LAUNCH / "zero3.json")
    _, args = train_command("finetune_lora.sh", NUM_GPUS="2", ZERO="3_offload")
    assert flag(args, "--deepspeed") == str(LAUNCH / "zero3_offload.json")
    _, args = train_command("finetune_lora.sh", NUM_GPUS="2", ZERO="0")
    assert "--deepspeed" not in args  # plain DDP
    proc = run_script("pretrain.sh", NUM_GPUS="2", ZERO="1")
    assert proc.returncode == 2 and "ZERO must be 0 (DDP), 2, 3 or 3_offload" in proc.stderr


def test_zero3_offload_config_is_zero3_with_cpu_offload():
    offload = json.loads((LAUNCH / "zero3_offload.json").read_text())
    zero3 = json.loads((LAUNCH / "zero3.json").read_text())
    assert offload["zero_optimization"].pop("offload_optimizer") == {"device": "cpu", "pin_memory": True}
    assert offload["zero_optimization"].pop("offload_param") == {"device": "cpu", "pin_memory": True}
    # the Trainer's AdamW (with the projector's own learning rate) steps on the offloaded
    # float32 shards; DeepSpeed would otherwise insist on its own CPU Adam, built from one group
    assert offload.pop("zero_force_ds_cpu_optimizer") is False
    assert offload == zero3


def test_cpu_ranks_add_what_the_cpu_needs_and_change_nothing_else():
    gpu_launcher, gpu_args = train_command("finetune_lora.sh", NUM_GPUS="2")
    cpu_launcher, cpu_args = train_command("finetune_lora.sh", NUM_GPUS="2", DEVICE="cpu")
    assert cpu_launcher == gpu_launcher  # deepspeed --num_gpus 2: on a CPU, 2 processes
    assert (flag(cpu_args, "--use_cpu"), flag(cpu_args, "--tf32"), flag(cpu_args, "--ddp_backend")) == (
        "True", "False", "gloo")
    assert flag(gpu_args, "--tf32") == "True" and "--use_cpu" not in gpu_args
    def without(args, flags):  # the arguments less these flags and their values
        out, skip = [], False
        for a in args:
            if not skip and a not in flags:
                out.append(a)
            skip = a in flags
        return out
    device_flags = {"--use_cpu", "--tf32", "--ddp_backend"}
    assert without(cpu_args, device_flags) == without(gpu_args, device_flags)
    _, args = train_command("finetune_lora.sh", DEVICE="cpu")
    assert flag(args, "--per_device_train_batch_size") == "8"  # 2 CPU ranks unless NUM_GPUS says otherwise
    proc = run_script("finetune_lora.sh", DEVICE="tpu")
    assert proc.returncode == 2 and "DEVICE must be cuda or cpu" in proc.stderr


def test_torchrun_runs_one_command_per_node():
    launcher, args = train_command("finetune_lora.sh", LAUNCHER="torchrun", NNODES="2", NODE_RANK="1",
                                   NUM_GPUS="8", MASTER_ADDR="node1", MASTER_PORT="29601")
    assert Path(launcher[0]).name == "torchrun" and launcher[-2:] == ["-m", TRAIN_MODULE]
    assert launcher[1:-2] == ["--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "8",
                              "--master_addr", "node1", "--master_port", "29601"]
    # global batch 16 over 16 GPUs
    assert (flag(args, "--per_device_train_batch_size"), flag(args, "--gradient_accumulation_steps")) == ("1", "1")
    assert flag(args, "--deepspeed") == str(LAUNCH / "zero3.json")


@pytest.mark.parametrize("env, says", [
    ({"NNODES": "2"}, "NNODES=2 is torchrun's"),
    ({"LAUNCHER": "torchrun", "HOSTFILE": "hosts"}, "HOSTFILE is DeepSpeed's launcher's"),
    ({"LAUNCHER": "torchrun", "NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK must be in 0..NNODES-1"),
    ({"LAUNCHER": "mpirun"}, "LAUNCHER must be deepspeed or torchrun"),
])
def test_inconsistent_node_settings_are_refused_naming_them(env, says):
    proc = run_script("finetune_lora.sh", **env)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr


def test_hostfile_launch_takes_the_world_size_from_its_slots(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nworker-1 slots=8\nworker-2 slots=8\n\n")
    launcher, args = train_command("pretrain.sh", HOSTFILE=str(hostfile), MASTER_PORT="29601")
    assert launcher[1:] == ["--hostfile", str(hostfile), "--master_port", "29601", "--module", TRAIN_MODULE]
    assert (flag(args, "--per_device_train_batch_size"), flag(args, "--gradient_accumulation_steps")) == ("4", "1")


def test_cuda_visible_devices_become_deepspeeds_include_list():
    # deepspeed takes GPUs 0..N-1 when given --num_gpus, whatever CUDA_VISIBLE_DEVICES says
    launcher, args = train_command("finetune_lora.sh", CUDA_VISIBLE_DEVICES="2,3")
    assert launcher[1:3] == ["--include", "localhost:2,3"] and "--num_gpus" not in launcher
    assert flag(args, "--per_device_train_batch_size") == "8"
    proc = run_script("finetune_lora.sh", CUDA_VISIBLE_DEVICES="2,3", NUM_GPUS="4")
    assert proc.returncode == 2 and "CUDA_VISIBLE_DEVICES" in proc.stderr


def test_environment_overrides_reach_the_command(tmp_path):
    env = {"NUM_GPUS": "2", "MODEL": str(tmp_path / "llm"), "VISION_TOWER": str(tmp_path / "clip"),
           "DATA_PATH": str(tmp_path / "fea.json"), "IMAGE_FOLDER": str(tmp_path / "faces"),
           "OUTPUT_DIR": str(tmp_path / "my-llava-lora"), "LR": "1e-4", "PROJ_LR": "3e-5", "LORA_R": "64",
           "LORA_ALPHA": "128", "EPOCHS": "2", "REPORT_TO": "wandb", "EXTRA_ARGS": "--save_steps 7 --seed 3"}
    _, args = train_command("finetune_lora.sh", **env)
    expected = {"--model_name_or_path": env["MODEL"], "--vision_tower": env["VISION_TOWER"],
                "--data_path": env["DATA_PATH"], "--image_folder": env["IMAGE_FOLDER"],
                "--output_dir": env["OUTPUT_DIR"], "--learning_rate": "1e-4", "--mm_projector_lr": "3e-5",
                "--lora_r": "64", "--lora_alpha": "128", "--num_train_epochs": "2", "--report_to": "wandb",
                "--save_steps": "7", "--seed": "3"}
    assert {k: flag(args, k) for k in expected} == expected


def test_both_stages_build_the_same_feallm_projector():
    """Stage 2 rebuilds the projector from its flags, then loads stage 1's weights strictly."""
    def projector_flags(args: list[str]) -> list[str]:
        out, keep = [], False
        for a in args:
            if a.startswith("--"):
                keep = a.startswith("--mm_feallm_") or a in ("--mm_projector_type", "--vision_tower",
                                                              "--mm_vision_select_layer", "--image_aspect_ratio")
            if keep:
                out.append(a)
        return out

    env = {"NUM_GPUS": "2", "FEALLM_ARGS": "--mm_feallm_mpp_points 2", "SHALLOW_LAYERS": "2 7"}
    _, stage1 = train_command("pretrain.sh", **env)
    _, stage2 = train_command("finetune_lora.sh", **env)
    assert projector_flags(stage1) == projector_flags(stage2)
    assert "--mm_feallm_mpp_points" in projector_flags(stage1)


def test_both_training_scripts_source_the_common_launcher_file():
    source = 'source "$(dirname "${BASH_SOURCE[0]}")/common.sh"'
    for name in ("pretrain.sh", "finetune_lora.sh"):
        lines = (LAUNCH / name).read_text().splitlines()
        assert lines.count(source) == 1, name
        assert not any(line.startswith("launch()") for line in lines), f"{name} defines its own launch()"
    common = (LAUNCH / "common.sh").read_text()
    assert "launch() {" in common and "ACCUM=" in common


def test_real_run_with_missing_inputs_stops_naming_them(tmp_path):
    proc = run_script("finetune_lora.sh", dry=False, NUM_GPUS="1", DEEPSPEED=str(tmp_path / "never-run"),
                      DATA_PATH=str(tmp_path / "missing.json"), STAGE1_DIR=str(tmp_path / "s1"))
    assert proc.returncode == 2
    assert f"DATA_PATH={tmp_path / 'missing.json'} does not exist" in proc.stderr
    assert "MM_PROJECTOR=" in proc.stderr and "launch/pretrain.sh first" in proc.stderr
    assert "deepspeed launcher" in proc.stderr


def test_a_llava_checkpoint_as_model_is_taken_and_said(tmp_path):
    model = tmp_path / "llava-v1.5-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"mm_projector_type": "mlp2x_gelu"}))
    proc = run_script("pretrain.sh", NUM_GPUS="1", MODEL=str(model))
    assert proc.returncode == 0 and "is a LLaVA checkpoint: FEALLM's tower and projector replace" in proc.stdout
    launcher, args = train_command("pretrain.sh", NUM_GPUS="1", MODEL=str(model))
    assert flag(args, "--model_name_or_path") == str(model) and flag(args, "--mm_projector_type") == "feallm"
    plain = run_script("pretrain.sh", NUM_GPUS="1")
    assert "is a LLaVA checkpoint" not in plain.stdout


def test_real_run_execs_exactly_the_printed_command(tmp_path):
    """Paths with spaces survive as single arguments into the launcher."""
    data = tmp_path / "my data"
    (data / "images").mkdir(parents=True)
    (data / "blip laion.json").write_text("[]")
    record = tmp_path / "argv.json"
    recorder = tmp_path / "deepspeed"
    recorder.write_text(f"#!{sys.executable}\nimport json, sys\n"
                        f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    recorder.chmod(0o755)
    env = {"NUM_GPUS": "1", "DEEPSPEED": str(recorder), "DATA_PATH": str(data / "blip laion.json"),
           "IMAGE_FOLDER": str(data / "images"), "OUTPUT_DIR": str(tmp_path / "out llava")}
    proc = run_script("pretrain.sh", dry=False, **env)
    (printed,) = printed_commands(proc)
    assert json.loads(record.read_text()) == printed[1:]
    assert (tmp_path / "out llava").is_dir()


# -- upstream's HfArgumentParser accepts every flag ----------------------------------------

PARSE = r"""
import json, sys
import feallm_llava
feallm_llava.register()
import transformers
import transformers.training_args as training_args
# A GPU cannot exist here: fake only the capability checks that --bf16 / --tf32 make.
training_args.is_torch_bf16_gpu_available = lambda: True
training_args.is_torch_tf32_available = lambda: True
from llava.train import train as upstream

out = []
for argv in json.load(sys.stdin):
    argv = ["--local_rank=0", *argv]  # what the deepspeed launcher adds in front
    parser = transformers.HfArgumentParser((upstream.ModelArguments, upstream.DataArguments,
                                            upstream.TrainingArguments))
    model, data, train, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    # argparse also takes unambiguous prefixes; the scripts must spell each flag in full
    inexact = [a for a in argv if a.startswith("--") and a.split("=")[0] not in parser._option_string_actions]
    out.append({"rest": rest, "inexact": inexact, "projector": model.mm_projector_type, "shallow": model.mm_feallm_shallow_layers,
                "lca_channels": model.mm_feallm_lca_channels, "select": model.mm_vision_select_layer,
                "lora_r": train.lora_r, "lora_alpha": train.lora_alpha, "proj_lr": train.mm_projector_lr,
                "lr": train.learning_rate, "batch": train.per_device_train_batch_size,
                "accum": train.gradient_accumulation_steps, "deepspeed": train.deepspeed,
                "image_folder": data.image_folder, "bf16": train.bf16})
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    """The printed train arguments of both stages (ZeRO-2 and 3, 2 and 8 GPUs), parsed by
    upstream's own argument classes in one subprocess (importing llava takes a while)."""
    tmp = tmp_path_factory.mktemp("parse")
    for d in ("llm", "clip", "images"):
        (tmp / d).mkdir()
    (tmp / "train.json").write_text("[]")
    # Existing local paths: the registry refuses missing ones offline (no hub download).
    env = {"MODEL": str(tmp / "llm"), "VISION_TOWER": str(tmp / "clip"), "DATA_PATH": str(tmp / "train.json"),
           "IMAGE_FOLDER": str(tmp / "images"), "OUTPUT_DIR": str(tmp / "llava-run-lora")}
    cases = [(s, g, z) for s in ("pretrain.sh", "finetune_lora.sh") for g in ("2", "8") for z in ("2", "3")]
    argvs = [train_command(s, NUM_GPUS=g, ZERO=z, **env)[1] for s, g, z in cases]
    proc = subprocess.run([sys.executable, "-c", PARSE], input=json.dumps(argvs), capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return dict(zip(cases, json.loads(lines[0][len("RESULT "):]))), tmp


def test_upstream_argument_parser_accepts_every_printed_flag(parsed):
    results, _ = parsed
    for case, got in results.items():
        assert got["rest"] == [] and got["inexact"] == [], (case, got["rest"], got["inexact"])


def test_parsed_arguments_carry_the_paper_settings(parsed):
    results, tmp = parsed
    for (script, gpus, zero), got in results.items():
        assert got["projector"] == "feallm" and got["shallow"] == [3, 8, 13, 18]
        assert got["lca_channels"] == 64 and got["select"] == -2 and got["bf16"] is True
        assert got["deepspeed"] == str(LAUNCH / f"zero{zero}.json")
        assert got["image_folder"] == str(tmp / "images")
        global_batch = 64 if script == "pretrain.sh" else 16
        assert got["batch"] * got["accum"] * int(gpus) == global_batch
        if script == "finetune_lora.sh":
            assert (got["lora_r"], got["lora_alpha"], got["lr"], got["proj_lr"]) == (128, 256, 2e-4, 2e-5)
        else:
            assert (got["lr"], got["proj_lr"]) == (1e-3, None)


# -- eval.sh -----------------------------------------------------------------------------

def _parse_feallm(cmd: list[str]):
    """Parse one printed `python -m feallm_llava.cli ...` command with the real CLI parser."""
    from feallm_llava.cli import build_parser

    argv = cmd[cmd.index("feallm_llava.cli") + 1:]
    return build_parser(argv[0]).parse_args(argv)


def test_eval_dry_run_spreads_chunks_over_gpus_then_merges_and_scores(tmp_path):
    for d in ("fea", "raf"):
        (tmp_path / d).mkdir()
    proc = run_script("eval.sh", GPU_LIST="0,1", BENCHES="feabench rafdb", FEABENCH_DATA=str(tmp_path / "fea"),
                      RAFDB_DATA=str(tmp_path / "raf"), MODEL_PATH=str(tmp_path / "feallm-llava-7b-lora"),
                      OUT=str(tmp_path / "out"), NAME="FEALLM")
    cmds = printed_commands(proc)
    assert len(cmds) == 2 * 3 + 1  # per benchmark: 2 chunks + merge; then one score
    chunks = [c for c in cmds if "--chunk-idx" in c]
    assert [c[1] for c in chunks] == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"] * 2
    for cmd in cmds[:-1]:
        args = _parse_feallm(cmd)
        assert args.command == "eval" and args.num_chunks == 2
        assert args.model_path == str(tmp_path / "feallm-llava-7b-lora")
        assert args.model_base == "lmsys/vicuna-7b-v1.5"  # a LoRA checkpoint needs its base
    score = _parse_feallm(cmds[-1])
    assert score.command == "score" and score.name == ["FEALLM", "FEALLM"]
    assert score.predictions == [tmp_path / "out" / b / "predictions.jsonl" for b in ("feabench", "rafdb")]


def test_eval_names_a_missing_dataset_the_user_asked_for(tmp_path):
    proc = run_script("eval.sh", dry=False, BENCHES="rafdb", RAFDB_DATA=str(tmp_path / "nope"),
                      OPENAI_MODEL="fake", OUT=str(tmp_path / "out"))
    assert proc.returncode == 2 and "RAFDB_DATA" in proc.stderr and str(tmp_path / "nope") in proc.stderr


def test_eval_takes_a_full_checkpoint_without_base_and_refuses_a_missing_local_one(tmp_path):
    (tmp_path / "raf").mkdir()
    env = {"BENCHES": "rafdb", "RAFDB_DATA": str(tmp_path / "raf"), "GPU_LIST": "", "OUT": str(tmp_path / "out")}
    (cmd, _score) = printed_commands(run_script("eval.sh", MODEL_PATH="liuhaotian/llava-v1.5-7b", **env))
    args = _parse_feallm(cmd)
    assert (args.model_path, args.model_base) == ("liuhaotian/llava-v1.5-7b", None)
    proc = run_script("eval.sh", dry=False, MODEL_PATH=str(tmp_path / "no-such-llava-lora"), **env)
    assert proc.returncode == 2 and f"MODEL_PATH={tmp_path / 'no-such-llava-lora'} does not exist" in proc.stderr


def test_eval_runs_llavas_own_benchmarks_through_upstreams_scripts(tmp_path):
    """BENCHES=pope textvqa sqa: upstream's generation script, then its scorer, on the files
    LLaVA's scripts/v1_5/eval/*.sh read under DATA_ROOT."""
    data = tmp_path / "eval"
    for path in ("pope/llava_pope_test.jsonl", "textvqa/llava_textvqa_val_v051_ocr.jsonl",
                 "scienceqa/llava_test_CQM-A.json"):
        (data / path).parent.mkdir(parents=True, exist_ok=True)
        (data / path).write_text("")
    ckpt = tmp_path / "feallm-llava-7b-lora"
    ckpt.mkdir()
    env = {"BENCHES": "pope textvqa sqa", "DATA_ROOT": str(data), "MODEL_PATH": str(ckpt), "GPU_LIST": "0",
           "OUT": str(tmp_path / "out")}
    cmds = printed_commands(run_script("eval.sh", **env))
    assert [c[c.index("-m") + 1] for c in cmds] == ["llava.eval.model_vqa_loader", "llava.eval.eval_pope",
                                                     "llava.eval.model_vqa_loader", "llava.eval.eval_textvqa",
                                                     "llava.eval.model_vqa_science", "llava.eval.eval_science_qa"]
    pope = cmds[0]
    assert pope[:2] == ["env", "CUDA_VISIBLE_DEVICES=0"]
    assert flag(pope, "--question-file") == str(data / "pope" / "llava_pope_test.jsonl")
    assert flag(pope, "--image-folder") == str(data / "pope" / "val2014")
    assert (flag(pope, "--model-path"), flag(pope, "--model-base")) == (str(ckpt), "lmsys/vicuna-7b-v1.5")
    assert (flag(pope, "--temperature"), flag(pope, "--conv-mode")) == ("0", "vicuna_v1")
    assert flag(cmds[1], "--result-file") == flag(pope, "--answers-file") == str(tmp_path / "out" / "pope" / "answers.jsonl")
    assert "--single-pred-prompt" in cmds[4]
    refused = run_script("eval.sh", dry=False, BENCHES="pope", DATA_ROOT=str(data), OPENAI_MODEL="gpt-4o",
                         OUT=str(tmp_path / "o"))
    assert refused.returncode == 2 and "not OPENAI_MODEL" in refused.stderr


def _happy(req) -> str:
    return "Happiness. The cheeks are raised (AU6) and the lip corners pulled (AU12)."


def test_eval_runs_every_benchmark_with_data_and_scores_them(tmp_path):
    """End to end through `feallm eval` and `feallm score`, against an OpenAI-compatible
    server on 127.0.0.1; the benchmarks without data are skipped and said so."""
    fea = tmp_path / "fea"
    (fea / "faces").mkdir(parents=True)
    items = []
    for i, (expr, aus) in enumerate([("Happiness", [6, 12]), ("Sadness", [1, 4, 15])]):
        Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(fea / "faces" / f"{i}.jpg")
        items.append({"id": f"v{i}_1", "image": f"{i}.jpg", "expression": expr, "aus": aus, "subject": f"v{i}"})
    (fea / "eval.json").write_text(json.dumps(items))
    raf = tmp_path / "raf"
    (raf / "EmoLabel").mkdir(parents=True)
    (raf / "Image" / "aligned").mkdir(parents=True)
    (raf / "EmoLabel" / "list_patition_label.txt").write_text("test_0001.jpg 4\ntest_0002.jpg 7\n")
    for stem in ("test_0001", "test_0002"):
        Image.new("RGB", (16, 16), (9, 9, 9)).save(raf / "Image" / "aligned" / f"{stem}_aligned.jpg")
    with start_fake_openai(_happy) as server:
        proc = run_script("eval.sh", dry=False, OPENAI_MODEL="fake-vlm", BASE_URL=server.base_url,
                          OPENAI_API_KEY="test", FEABENCH_DATA=str(fea), FEABENCH_IMAGES=str(fea / "faces"),
                          RAFDB_DATA=str(raf), DATA_ROOT=str(tmp_path / "absent"), OUT=str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for bench in ("affectnet", "bp4d", "disfa"):
        assert re.search(rf"{bench}: no data at .*: skipped", proc.stdout), proc.stdout
    scores = json.loads((tmp_path / "out" / "scores" / "scores.json").read_text())
    rows = {(r["bench"], r["model"]): r for r in scores["rows"]}
    assert set(rows) == {("feabench", "fake-vlm"), ("rafdb", "fake-vlm")}
    # the fake answers Happiness: right on one of the two faces of each set
    assert rows["feabench", "fake-vlm"]["fer"]["accuracy"] == rows["rafdb", "fake-vlm"]["fer"]["accuracy"] == 0.5
    assert (tmp_path / "out" / "scores" / "table.md").is_file()
    raf_lines = (tmp_path / "out" / "rafdb" / "predictions.jsonl").read_text().splitlines()
    assert len(raf_lines) == 2 and all(json.loads(x)["model"] == "fake-vlm" for x in raf_lines)


def test_tiny_ranks_runs_both_launchers_on_two_cpu_ranks(tmp_path):
    proc = run_script("tiny_ranks.sh", OUT=str(tmp_path / "tiny-ranks"))
    stage1, stage2 = printed_commands(proc)
    for cmd, zero in ((stage1, "zero2.json"), (stage2, "zero3.json")):
        launcher, args = cmd[:cmd.index(TRAIN_MODULE) + 1], cmd[cmd.index(TRAIN_MODULE) + 1:]
        assert launcher[1:3] == ["--num_gpus", "2"] and flag(args, "--deepspeed") == str(LAUNCH / zero)
        assert flag(args, "--use_cpu") == "True" and flag(args, "--model_name_or_path").endswith("kit/llm")
    assert flag(stage2[stage2.index(TRAIN_MODULE):], "--lora_enable") == "True"
