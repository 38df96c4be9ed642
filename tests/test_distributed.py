"""FEALLM trains across processes through upstream's train_mem and the two launchers.

Stage 1 under DeepSpeed ZeRO-2, stage 2 (LoRA, `--mm_projector_lr`) under ZeRO-3, plain DDP
and two nodes of one rank each, all on CPU ranks (`DEVICE=cpu`: gloo on 127.0.0.1) through
`launch/pretrain.sh` and `launch/finetune_lora.sh`, the tiny kit standing in for the 7B
models. A one-process run of the same global batch is the reference: 2 ranks x batch 2
must log its losses and save its weights (float32, within the tolerances below).

The ZeRO-3 runs use launch/zero3.json with `stage3_param_persistence_threshold` 0, so that
every parameter is partitioned (the tiny kit's are small enough to be kept whole under
"auto"): a parameter read outside its module's forward would be read empty.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
STEPS = 4
# 2 ranks x batch 2 against 1 rank x batch 4, float32: the loss of a step is the mean of
# the ranks' token means instead of one token mean (equal up to the split of tokens over
# ranks), and reductions run in another order.
LOSS_RTOL = 5e-3
# Weights: the Frobenius norm of the difference over that of the weights, all tensors
# together (AdamW moves an element with a near-zero gradient by about the learning rate
# either way, so single elements may differ by that much).
WEIGHT_RTOL = 1e-3
TEXT_ONLY = {"id": "text-only", "conversations": [
    {"from": "human", "value": "Which action unit is the Lip Corner Puller?"},
    {"from": "gpt", "value": "AU12 is the Lip Corner Puller."}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(kit, tmp_path_factory) -> Path:
    """The tiny sample data; stage 2's has one text-only conversation among its 16 (LLaVA's
    own instruction mix has them: every rank must still run the projector, or ZeRO-3 hangs)."""
    from feallm_llava.tinykit import write_sample_data

    root = tmp_path_factory.mktemp("ds-data")
    write_sample_data(root)
    items = json.loads((root / "finetune.json").read_text())
    assert len(items) == STEPS * 4, "one epoch must be STEPS steps of global batch 4"
    items[5] = TEXT_ONLY
    (root / "finetune_text.json").write_text(json.dumps(items))
    for name in ("zero3", "zero3_offload"):
        config = json.loads((LAUNCH / f"{name}.json").read_text())
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (root / f"{name}_all.json").write_text(json.dumps(config))
    return root


def launch_env(kit, data: Path, out: Path, **env) -> dict:
    return {
        **os.environ, "PY": sys.executable, "DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
        "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),  # DeepSpeed's compiled shm op
        "MODEL": str(kit.llm), "VISION_TOWER": str(kit.clip), "IMAGE_FOLDER": str(data / "images"),
        "DATA_PATH": str(data / "pretrain.json"), "OUTPUT_DIR": str(out), "GLOBAL_BATCH": "4",
        "MAX_LEN": "512", "WORKERS": "0", "CROP_SIZE": "32", "SAVE_STEPS": "100", "LORA_R": "16", "LORA_ALPHA": "32",
        "FEALLM_ARGS": "--mm_feallm_mpp_dim 0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
        "EXTRA_ARGS": f"--max_steps {STEPS} --seed 0 --data_seed 0 --bf16 False",
        **env,
    }


def stage2_env(data: Path, stage1: Path, **env) -> dict:
    return {"DATA_PATH": str(data / "finetune_text.json"), "MM_PROJECTOR": str(stage1 / "mm_projector.bin"),
            "LORA_DROPOUT": "0", **env}


def run(script: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(LAUNCH / script)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def agreement(what: str, got: Path, want: Path, *files: str) -> None:
    """Assert and print (`pytest -rP` shows it) how far two runs' losses and weights are apart."""
    a, b = losses(got), losses(want)
    assert len(a) == len(b) == STEPS
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    assert a == pytest.approx(b, rel=LOSS_RTOL)
    rel = [assert_same_weights(weights(got / f), weights(want / f), WEIGHT_RTOL) for f in files]
    print(f"{what}: losses {a} vs {b}, largest relative difference {worst:.2g}; weights "
          + ", ".join(f"{f} {r:.2g}" for f, r in zip(files, rel)))


def losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from feallm_llava.model.weights import load_weights

    return {k: v.float() for k, v in load_weights(path).items()}


def assert_same_weights(got: dict, want: dict, rtol: float) -> float:
    """Same names and shapes, no empty tensor, ||got - want|| <= rtol ||want|| over all tensors;
    returns that relative difference."""
    assert set(got) == set(want)
    diff = norm = 0.0
    for name, value in want.items():
        assert got[name].shape == value.shape and value.numel() > 0, name
        diff += (got[name] - value).square().sum().item()
        norm += value.square().sum().item()
    relative = (diff / norm) ** 0.5
    assert relative <= rtol, f"relative difference {relative:.3g} > {rtol}"
    return relative


# -- the runs (each once per module) -------------------------------------------------

@pytest.fixture(scope="module")
def stage1_one(kit, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("s1-one") / "llava-s1-one"
    run("pretrain.sh", launch_env(kit, data, out, NUM_GPUS="1", ZERO="0", LAUNCHER="torchrun"))
    return out


@pytest.fixture(scope="module")
def stage1_zero2(kit, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("s1-z2") / "llava-s1-zero2"
    run("pretrain.sh", launch_env(kit, data, out, NUM_GPUS="2"))
    return out


@pytest.fixture(scope="module")
def stage1_two_nodes(kit, data, tmp_path_factory) -> Path:
    """Plain DDP over two 'nodes' of one rank each (two torchrun commands, rendezvous on 127.0.0.1)."""
    out = tmp_path_factory.mktemp("s1-nodes") / "llava-s1-two-nodes"
    base = launch_env(kit, data, out, NUM_GPUS="1", NNODES="2", ZERO="0", LAUNCHER="torchrun")
    procs = [subprocess.Popen(["bash", str(LAUNCH / "pretrain.sh")], env={**base, "NODE_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"node {rank} failed:\n{log[-6000:]}"
    return out


@pytest.fixture(scope="module")
def stage2_one(kit, data, stage1_one, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("s2-one") / "llava-s2-one-lora"
    run("finetune_lora.sh", launch_env(kit, data, out, **stage2_env(data, stage1_one, NUM_GPUS="1", ZERO="0",
                                                                    LAUNCHER="torchrun")))
    return out


@pytest.fixture(scope="module")
def stage2_zero3(kit, data, stage1_one, tmp_path_factory) -> Path:
    """Stage 2 as launch/finetune_lora.sh runs it (ZeRO-3, gradient checkpointing, grouped by
    modality), on 2 CPU ranks, in float32 without LoRA dropout, to be compared with one process."""
    out = tmp_path_factory.mktemp("s2-z3") / "llava-s2-zero3-lora"
    run("finetune_lora.sh", zero3_env(kit, data, stage1_one, out))
    return out


def zero3_env(kit, data, stage1: Path, out: Path) -> dict:
    return launch_env(kit, data, out, **stage2_env(data, stage1), NUM_GPUS="2", DS_CONFIG=str(data / "zero3_all.json"))


# -- tests ------------------------------------------------------------------------------

def test_stage1_zero2_on_two_cpu_ranks_equals_one_process(stage1_zero2, stage1_one):
    agreement("stage 1, ZeRO-2 2x2 vs 1x4", stage1_zero2, stage1_one, "mm_projector.bin")


def test_ddp_over_two_nodes_equals_one_process(stage1_two_nodes, stage1_one):
    agreement("stage 1, DDP 2 nodes x 1 rank x 2 vs 1x4", stage1_two_nodes, stage1_one, "mm_projector.bin")


def test_stage2_zero3_lora_on_two_cpu_ranks_equals_one_process(stage2_zero3, stage2_one):
    # a text-only conversation among the 16: ranks did not hang, and every saved weight is whole
    agreement("stage 2, ZeRO-3 2x2 vs 1x4", stage2_zero3, stage2_one, "non_lora_trainables.bin",
              "adapter_model.safetensors")


def test_zero3_stage2_loads_with_upstreams_loader_and_answers(stage2_zero3, kit, load_lora_and_answer):
    load_lora_and_answer(stage2_zero3, kit.llm)


def test_killed_zero3_run_resumes_to_the_weights_of_an_unkilled_one(kit, data, stage1_one, stage2_zero3, tmp_path):
    out = tmp_path / "llava-s2-resumed-lora"
    env = {**zero3_env(kit, data, stage1_one, out), "SAVE_STEPS": "2"}
    proc = subprocess.Popen(["bash", str(LAUNCH / "finetune_lora.sh")], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = out / "checkpoint-2" / "feallm_checkpoint_complete"
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert proc.poll() is None, f"the run ended before its first checkpoint:\n{proc.stdout.read()[-6000:]}"
        assert time.monotonic() < deadline, "no checkpoint-2 within 10 minutes"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    assert not (out / "non_lora_trainables.bin").exists(), "killed after it finished: nothing to resume"

    env["MASTER_PORT"] = str(free_port())
    resumed = run("finetune_lora.sh", env)
    # it went on from checkpoint-2: two steps were left to train (a fresh start logs four)
    assert (resumed.stdout + resumed.stderr).count("{'loss': ") == STEPS - 2
    # DeepSpeed restored the partitioned optimizer, the scheduler and each rank's RNG: the
    # steps are the unkilled run's
    agreement("resumed ZeRO-3 vs unkilled", out, stage2_zero3, "non_lora_trainables.bin", "adapter_model.safetensors")


# compat shim left off -> (CPU ranks, ZeRO stage, what upstream fails with)
WITHOUT_SHIM = {
    "deepspeed_cpu_start": ("2", "3", "train_batch_size is not equal to micro_batch_per_gpu"),
    "empty_param_groups": ("1", "2", "zip() argument 2 is longer than argument 1"),
    "zero3_half_precision": ("1", "3", "expected m1 and m2 to have the same dtype"),
}


def test_without_the_shim_deepspeed_training_fails_as_known(kit, data, stage1_one, tmp_path):
    # the recipe's stage 2 (LoRA, --mm_projector_lr, bf16) with one compat shim left off, the
    # three runs side by side (each fails within its first step)
    procs = {}
    for shim, (ranks, zero, _) in WITHOUT_SHIM.items():
        env = launch_env(kit, data, tmp_path / f"llava-without-{shim}-lora", **stage2_env(data, stage1_one),
                         NUM_GPUS=ranks, ZERO=zero, FEALLM_COMPAT_SKIP=shim,
                         EXTRA_ARGS="--max_steps 1 --gradient_checkpointing False")
        procs[shim] = subprocess.Popen(["bash", str(LAUNCH / "finetune_lora.sh")], env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for shim, proc in procs.items():
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode != 0 and WITHOUT_SHIM[shim][2] in out, f"without {shim}:\n{out[-4000:]}"


def test_stage1_projector_loads_into_a_zero3_partitioned_projector(kit, data, stage1_one, tmp_path):
    """A FEALLM checkpoint as MODEL: its projector is built inside from_pretrained, so ZeRO-3
    partitions it before --pretrain_mm_mlp_adapter loads stage 1's weights into it. In bf16, as
    the recipe (what upstream builds after from_pretrained is cast to bf16 with the LLM), and
    with the optimizer and parameters offloaded to CPU memory (launch/zero3_offload.json)."""
    from feallm_llava.tinykit import build_llava

    model = build_llava(tmp_path / "llava-tiny-full", kit, mm_feallm_crop_size=32, mm_feallm_mpp_dim=0)
    out = tmp_path / "llava-into-partitioned-lora"
    env = launch_env(kit, data, out, **stage2_env(data, stage1_one), NUM_GPUS="2", MODEL=str(model), LR="0",
                     PROJ_LR="0", DS_CONFIG=str(data / "zero3_offload_all.json"),
                     EXTRA_ARGS="--max_steps 1 --save_steps 10 --gradient_checkpointing False")
    run("finetune_lora.sh", env)
    saved = {k.rsplit("mm_projector.", 1)[1]: v for k, v in weights(out / "non_lora_trainables.bin").items()}
    stage1 = {k.rsplit("mm_projector.", 1)[1]: v.to(torch.bfloat16).float()
              for k, v in weights(stage1_one / "mm_projector.bin").items()}
    assert_same_weights(saved, stage1, rtol=0.0)  # learning rate 0: what was loaded (in bf16) is what is saved
