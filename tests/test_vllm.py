"""FEALLM on vLLM: `feallm export-vllm` and its refusals; the export served by
`launch/serve_vllm.sh` answers as the LLaVA runner does, token for token.

The served tests need `.venv-vllm` (`bash launch/bootstrap.sh --env vllm`; `launch/test.sh`
builds it) and skip, saying so, without it. The tiny kit here has 2 heads of 32 (vLLM's
CPU attention has no head size 16, the default kit's) and is trained a few steps through
upstream's train script (48 LoRA steps: after 16, one greedy choice in 16 answers was a tie of 5e-5
that float rounding decided),
so the LoRA export path is the one exercised.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from feallm_llava.cli import main as cli
from feallm_llava.tinykit import KitSpec, build_kit, build_llava

REPO = Path(__file__).resolve().parents[1]
VLLM_VENV = Path(os.environ.get("FEALLM_VLLM_VENV", REPO / ".venv-vllm"))
needs_vllm = pytest.mark.skipif(
    not (VLLM_VENV / "bin" / "python").exists(),
    reason=f"{VLLM_VENV} is absent: `bash launch/bootstrap.sh --env vllm` builds it (launch/test.sh does)")
SPEC = KitSpec(llm_hidden=64, llm_heads=2)  # head_dim 32
MAX_TOKENS = 24
QUESTION = "Please describe the expression in this face."


@pytest.fixture(scope="module")
def vkit(tmp_path_factory):
    return build_kit(tmp_path_factory.mktemp("vkit"), SPEC)


@pytest.fixture(scope="module")
def trained(vkit, tmp_path_factory):
    from feallm_llava.recipe import TinyRecipe

    recipe = TinyRecipe(out=tmp_path_factory.mktemp("vtrain"), kit=vkit.root, steps1=2, steps2=48, lr2=3e-3,
                        save_steps=100)
    recipe.run()
    return recipe


@pytest.fixture(scope="module")
def full(vkit, tmp_path_factory):
    """A full (non-LoRA) FEALLM checkpoint, random projector."""
    return build_llava(tmp_path_factory.mktemp("vfull") / "tiny-llava-v1-feallm", vkit,
                       mm_feallm_crop_size=32, mm_feallm_mpp_dim=0)


def _export(capsys, *args) -> tuple[int, str, str]:
    code = cli(["export-vllm", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _safetensor_keys(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


# -- export-vllm ----------------------------------------------------------------------------

def test_export_places_every_weight_under_hf_llava_names(full, tmp_path, capsys):
    code, out, _ = _export(capsys, "--model-path", full, "--out", tmp_path / "out", "--dtype", "float32")
    assert code == 0 and "none missing, none unused" in out
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["FeallmLlavaForConditionalGeneration"] and cfg["model_type"] == "llava"
    assert cfg["feallm_image_tokens"] == 4 * 4 + 1  # the 4 x 4 patch grid and the LCA's token
    assert cfg["vision_feature_layer"] == [23, 3, 8, 13, 18]  # -2 of 24 layers, then the MPP's
    assert cfg["mm_feallm_crop_size"] == 32 and cfg["feallm_conv_template"] == "v1"
    assert "feallm_stop" not in cfg  # v1's answers end with EOS
    assert cfg["vision_config"]["model_type"] == "clip_vision_model" and cfg["text_config"]["model_type"] == "llama"
    keys = _safetensor_keys(tmp_path / "out" / "model.safetensors")
    assert {k.split(".")[0] for k in keys} == {"language_model", "vision_tower", "multi_modal_projector"}
    assert "language_model.lm_head.weight" in keys
    assert any(k.startswith("multi_modal_projector.lca.") for k in keys)
    assert any(k.startswith("vision_tower.vision_model.encoder.layers.23.") for k in keys)
    template = (tmp_path / "out" / "chat_template.jinja").read_text()
    assert template.startswith("{{ bos_token }}") and "ASSISTANT:" in template
    tok = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert any(t["content"] == "<image>" for t in tok["added_tokens_decoder"].values())


def test_export_takes_a_plain_llava_15_checkpoint(vkit, tmp_path, capsys):
    ckpt = build_llava(tmp_path / "tiny-llava-v1-mlp", vkit, projector_type="mlp2x_gelu")
    assert _export(capsys, "--model-path", ckpt, "--out", tmp_path / "out", "--dtype", "float32")[0] == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["feallm_image_tokens"] == 16
    assert cfg["vision_feature_layer"] == 23
    keys = _safetensor_keys(tmp_path / "out" / "model.safetensors")
    assert {k for k in keys if k.startswith("multi_modal_projector.")} == {
        f"multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}


def test_export_takes_a_projector_only_checkpoint_with_its_base(trained, vkit, tmp_path, capsys):
    stage1 = trained.stage_dir(1)  # mm_projector.bin only, trained with the `plain` template
    code, out, err = _export(capsys, "--model-path", stage1, "--model-base", vkit.llm, "--out", tmp_path / "out")
    assert code == 0, err
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["feallm_conv_template"] == "plain" and "projector 75" in out
    assert cfg["feallm_stop"] == "\n" and "send stop=['\\n']" in out  # vLLM stops at EOS only
    # stage 1's prompt: the image, then the caption's text, nothing between
    assert "replace('<image>\\n', '<image>')" in (tmp_path / "out" / "chat_template.jinja").read_text()
    code, _, err = _export(capsys, "--model-path", stage1, "--out", tmp_path / "out2")
    assert code == 2 and f"{stage1 / 'mm_projector.bin'}: a projector-only checkpoint needs --model-base" in err


def test_export_refuses_a_folder_without_config(tmp_path, capsys):
    (tmp_path / "llava-empty").mkdir()
    code, _, err = _export(capsys, "--model-path", tmp_path / "llava-empty", "--out", tmp_path / "out")
    assert code == 2 and f"{tmp_path / 'llava-empty' / 'config.json'}: not found" in err
    assert len(err.strip().splitlines()) == 1


def test_export_refuses_a_non_llava_folder(vkit, tmp_path, capsys):
    code, _, err = _export(capsys, "--model-path", vkit.llm, "--out", tmp_path / "out")
    assert code == 2 and f"{vkit.llm / 'config.json'}: not a LLaVA checkpoint" in err


def test_export_refuses_lora_without_base(trained, tmp_path, capsys):
    lora = trained.stage_dir(2)
    code, _, err = _export(capsys, "--model-path", lora, "--out", tmp_path / "out")
    assert code == 2 and f"{lora / 'adapter_config.json'}: a LoRA checkpoint needs --model-base" in err
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_missing_weight_naming_the_file(full, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / full.name
    shutil.copytree(full, broken)
    weights = broken / "model.safetensors"
    state = load_file(str(weights))
    dropped = next(k for k in sorted(state) if k.startswith("model.mm_projector."))
    del state[dropped]
    save_file(state, str(weights), metadata={"format": "pt"})
    code, _, err = _export(capsys, "--model-path", broken, "--out", tmp_path / "out")
    assert code == 2 and f"{weights}: weight {dropped} is missing" in err


# -- served by vLLM ---------------------------------------------------------------------------

@needs_vllm
def test_model_and_plugin_import_in_vllms_environment_without_llava():
    code = ("import sys, transformers, importlib.metadata as md\n"
            "import feallm_llava.model.projector, feallm_llava.vllm.model\n"
            "eps = [e.value for e in md.entry_points(group='vllm.general_plugins') if e.name == 'feallm']\n"
            "print(transformers.__version__.split('.')[0], 'llava' in sys.modules, eps)")
    proc = subprocess.run([str(VLLM_VENV / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          timeout=300, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == (
        "5 False ['feallm_llava.vllm.plugin:register']")


@dataclass
class Item:
    id: str
    question: str
    image: str
    crop: None = None

    def load_image(self) -> Image.Image:
        return Image.open(self.image).convert("RGB")


@pytest.fixture(scope="module")
def exported(trained, vkit, tmp_path_factory):
    out = tmp_path_factory.mktemp("vexport") / "feallm"
    assert cli(["export-vllm", "--model-path", str(trained.stage_dir(2)), "--model-base", str(vkit.llm),
                "--out", str(out), "--dtype", "float32"]) == 0
    return out


@needs_vllm
@pytest.mark.parametrize("legacy", [True, False])
def test_vllm_tokenizer_gives_upstreams_prompt_ids(exported, tmp_path, legacy):
    """Upstream's `tokenizer_image_token` (transformers 4.x slow tokenizer) and the plugin's
    tokenizer (transformers 5, vLLM's side) give the same ids, `legacy` either way
    (Vicuna-v1.5's tokenizer is non-legacy)."""
    from llava.mm_utils import tokenizer_image_token
    from transformers import AutoTokenizer

    from feallm_llava.inference.llava_runner import render_conversation

    folder = tmp_path / "tok"
    shutil.copytree(exported, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": legacy}))
    slow = AutoTokenizer.from_pretrained(folder, use_fast=False)
    image_id = slow.convert_tokens_to_ids("<image>")
    questions = [QUESTION, "What AUs?  Answer briefly.\nOk", "¿Qué emoción? 😀", " leading space", "AU12 and AU 6"]
    prompts = [render_conversation([("<image>\n" + q, None)], "v1") for q in questions]
    want = [[image_id if i == -200 else i for i in tokenizer_image_token(p, slow, -200)] for p in prompts]
    code = ("import json, sys\nfrom feallm_llava.vllm.tokenizer import LlavaLlamaTokenizer\n"
            "tok = LlavaLlamaTokenizer.from_pretrained(sys.argv[1])\n"
            "print(json.dumps([tok(p).input_ids for p in json.loads(sys.argv[2])]))")
    proc = subprocess.run([str(VLLM_VENV / "bin" / "python"), "-c", code, str(folder), json.dumps(prompts)],
                          capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == want


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    """`launch/serve_vllm.sh` on a free port of 127.0.0.1 (the benchmark's helper); its base URL."""
    from feallm_llava.bench.vllm_serving import vllm_server

    log = tmp_path_factory.mktemp("vserve") / "serve.log"
    with vllm_server(exported, venv=VLLM_VENV, log=log, timeout=600,
                     vllm_args=("--dtype", "float32", "--enforce-eager", "--max-model-len", "512")) as base:
        yield base


@pytest.fixture(scope="module")
def items(trained) -> list[Item]:
    """16 of the sample faces (64 x 48: the square padding matters)."""
    images = sorted((trained.data_dir / "images").glob("*.jpg"))[:16]
    assert len(images) >= 8
    return [Item(p.stem, QUESTION, str(p)) for p in images]


def _runner_token_ids(checkpoint: Path, base: Path, items) -> dict[str, list[int]]:
    from feallm_llava.inference.llava_runner import LlavaBackend

    backend = LlavaBackend(str(checkpoint), str(base), device="cpu", max_new_tokens=MAX_TOKENS)
    rows: list[list[int]] = []
    decode = backend._decode
    backend._decode = lambda row: (rows.append(row.tolist()), decode(row))[1]  # the ids it answers with
    out = {}
    for batch in (items[i:i + 8] for i in range(0, len(items), 8)):
        rows.clear()
        backend.generate(batch)
        for item, row in zip(batch, rows):
            eos = backend.tokenizer.eos_token_id
            out[item.id] = row[:row.index(eos) + 1] if eos in row else row
    return out


def _served_token_ids(base: str, model: str, items) -> dict[str, list[int]]:
    import openai

    client = openai.OpenAI(base_url=base, api_key="EMPTY", max_retries=0)
    out = {}
    for item in items:
        url = "data:image/jpeg;base64," + base64.b64encode(Path(item.image).read_bytes()).decode()
        response = client.chat.completions.create(
            model=model, temperature=0, max_tokens=MAX_TOKENS, extra_body={"return_token_ids": True},
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": item.question}]}])
        out[item.id] = list(response.choices[0].token_ids)
    return out


@needs_vllm
def test_served_greedy_tokens_equal_the_llava_runners(served, exported, trained, vkit, items):
    runner = _runner_token_ids(trained.stage_dir(2), vkit.llm, items)
    vllm = _served_token_ids(served, str(exported), items)
    assert vllm == runner
    assert len({tuple(ids) for ids in runner.values()}) > 1  # the answers depend on the image


@needs_vllm
def test_feallm_eval_base_url_answers_equal_model_path(served, exported, trained, vkit, items, tmp_path):
    data = tmp_path / "fea"
    data.mkdir()
    bench = []
    for item in items:
        shutil.copy(item.image, data / Path(item.image).name)
        bench.append({"id": f"s{item.id}", "image": Path(item.image).name, "expression": "Neutral", "aus": [],
                      "subject": "s0"})
    (data / "eval.json").write_text(json.dumps(bench))
    common = ["eval", "--bench", "feabench", "--data", str(data), "--max-new-tokens", str(MAX_TOKENS)]
    assert cli([*common, "--model-path", str(trained.stage_dir(2)), "--model-base", str(vkit.llm),
                "--device", "cpu", "--out", str(tmp_path / "llava")]) == 0
    assert cli([*common, "--openai-model", str(exported), "--base-url", served, "--concurrency", "32",
                "--out", str(tmp_path / "vllm")]) == 0

    def answers(run: str) -> dict[str, str]:
        lines = (tmp_path / run / "predictions.jsonl").read_text().splitlines()
        # An answer cut by the token limit inside a multi-byte character: the runner decodes
        # the lone bytes as U+FFFD, vLLM's detokenizer holds them back. Same tokens.
        return {r["id"]: r["answer"].rstrip("\ufffd") for r in map(json.loads, lines)}

    llava, vllm = answers("llava"), answers("vllm")
    assert len(llava) == 2 * len(items) and vllm == llava


@needs_vllm
def test_served_probabilities_equal_the_llava_runners(served, exported, trained, vkit, items):
    """Expression and AU probabilities through vLLM's prompt_logprobs and through the runner's
    shared prefix, on the same checkpoint: within 1e-3."""
    from feallm_llava.inference.llava_runner import LlavaBackend
    from feallm_llava.inference.openai_client import OpenAIBackend
    from feallm_llava.inference.scores import Scorer

    runner = Scorer(LlavaBackend(str(trained.stage_dir(2)), str(vkit.llm), device="cpu"), batch_size=8)
    vllm = Scorer(OpenAIBackend(str(exported), base_url=served, concurrency=16))
    few = items[:8]
    got, want = vllm.expressions(few), runner.expressions(few)
    diffs = [abs(got[i.id][e] - want[i.id][e]) for i in few for e in want[i.id]]
    assert max(diffs) <= 1e-3, max(diffs)
    assert len({round(max(want[i.id].values()), 3) for i in few}) > 1  # they depend on the image
    read = {few[0].id: [6, 12], few[1].id: []}
    got, want = vllm.aus(few[:2], read), runner.aus(few[:2], read)
    assert max(abs(got[k][au] - want[k][au]) for k in want for au in want[k]) <= 1e-3


@needs_vllm
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="tensor parallel 2 on a CPU needs 2 cores")
def test_tensor_parallel_2_on_a_cpu_answers_as_the_llava_runner(exported, trained, vkit, items, tmp_path):
    """`serve_vllm.sh --tensor-parallel-size 2` on this CPU machine: two vLLM workers (gloo),
    each on its own cores, the internal queue on loopback, the KV cache from free memory."""
    from feallm_llava.bench.vllm_serving import vllm_server

    few = items[:8]
    log = tmp_path / "tp2.log"
    # the launcher's own CPU choices, not the caller's
    environ = {"VLLM_CPU_OMP_THREADS_BIND": None, "VLLM_HOST_IP": None, "FEALLM_VLLM_CPU_MEMORY": None,
               "HF_HUB_OFFLINE": "1", "FEALLM_VLLM_KV_SHARE": "0.02"}
    with vllm_server(exported, venv=VLLM_VENV, log=log, timeout=600, serve_args=("--tensor-parallel-size", "2"),
                     vllm_args=("--dtype", "float32", "--enforce-eager", "--max-model-len", "512"),
                     environ=environ) as base:
        served = _served_token_ids(base, str(exported), few)
    text = log.read_text(errors="replace")
    assert "VLLM_CPU_OMP_THREADS_BIND=" in text and "world_size=2" in text.replace(" ", ""), text[-3000:]
    runner = _runner_token_ids(trained.stage_dir(2), vkit.llm, few)
    assert served == runner


# -- launch/serve_vllm.sh's command line (a stand-in python that prints what it is given) --------

def _serve(tmp_path, *args, **environ) -> subprocess.CompletedProcess:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    fake = venv / "bin" / "python"
    # its own checks (`python -c ...`) run; the server is replaced by an echo of its environment and flags
    fake.write_text(f'#!/usr/bin/env bash\n[ "$1" != -c ] || exec {sys.executable} "$@"\n'
                    'echo "ENV key=${VLLM_API_KEY:-} host_ip=${VLLM_HOST_IP:-} bind=${VLLM_CPU_OMP_THREADS_BIND:-}"\n'
                    'echo "ARGS $*"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in (
        "FEALLM_SERVE_HOST", "FEALLM_SERVE_SECRET", "FEALLM_SERVE_SECRET_FILE", "VLLM_API_KEY", "VLLM_HOST_IP",
        "VLLM_CPU_OMP_THREADS_BIND", "FEALLM_VLLM_CPU_MEMORY")}
    env.update(FEALLM_VLLM_VENV=str(venv), **environ)
    return subprocess.run(["bash", str(REPO / "launch" / "serve_vllm.sh"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def export_dir(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"architectures": ["FeallmLlavaForConditionalGeneration"],
                                                 "text_config": {"hidden_size": 64, "num_attention_heads": 2},
                                                 "torch_dtype": "float32"}))
    return out


def test_serve_binds_to_localhost_with_the_plugins_tokenizer(tmp_path, export_dir):
    proc = _serve(tmp_path, "--model", export_dir)
    assert proc.returncode == 0, proc.stderr
    args = proc.stdout.splitlines()[-1].split()
    assert args[:3] == ["ARGS", "-m", "vllm.entrypoints.openai.api_server"]
    assert args[args.index("--host") + 1] == "127.0.0.1" and args[args.index("--port") + 1] == "8000"
    assert args[args.index("--tokenizer-mode") + 1] == "feallm_llava"
    assert args[args.index("--dtype") + 1] == "float32"  # the export's, not vLLM's bf16 for float32 weights
    assert "WARNING" not in proc.stderr


def _on_gpu() -> bool:
    return bool(shutil.which("nvidia-smi")) and subprocess.run(["nvidia-smi"], capture_output=True,
                                                                check=False).returncode == 0


def test_serve_passes_parallelism_and_reads_its_key_from_the_environment_only(tmp_path, export_dir):
    key = tmp_path / "key"
    key.write_text("s3cret-s3cret-s3cret\n")
    proc = _serve(tmp_path, "--model", export_dir, "--host", "0.0.0.0", "--tensor-parallel-size", "2",
                  "--pipeline-parallel-size", "1", "--", "--max-model-len", "4096", FEALLM_SERVE_SECRET_FILE=str(key))
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr
    env_line, args_line = proc.stdout.splitlines()[-2:]
    assert "s3cret" not in args_line and "s3cret" not in proc.stderr  # not on vLLM's command line, not echoed
    assert "key=s3cret-s3cret-s3cret " in env_line + " " and "host_ip= " in env_line  # 0.0.0.0: vLLM picks
    args = args_line.split()
    for flag, value in (("--tensor-parallel-size", "2"), ("--pipeline-parallel-size", "1"),
                        ("--max-model-len", "4096"), ("--host", "0.0.0.0")):
        assert args[args.index(flag) + 1] == value
    assert "--api-key" not in args


def test_serve_refuses_an_exposed_host_without_a_key_and_a_key_on_the_command_line(tmp_path, export_dir):
    refused = _serve(tmp_path, "--model", export_dir, "--host", "0.0.0.0")
    assert refused.returncode == 2 and "refusing to serve on 0.0.0.0 without an API key" in refused.stderr
    insecure = _serve(tmp_path, "--model", export_dir, "--host", "0.0.0.0", "--insecure")
    assert insecure.returncode == 0 and "WARNING: serving on 0.0.0.0 without an API key" in insecure.stderr
    for args in (("--api-key", "s3cret"), ("--", "--api-key", "s3cret")):
        proc = _serve(tmp_path, "--model", export_dir, *args)
        assert proc.returncode == 2 and "visible to every user in ps" in proc.stderr


def test_serve_on_a_cpu_binds_each_worker_to_its_cores_on_loopback_with_a_kv_cache_from_free_memory(
        tmp_path, export_dir):
    if _on_gpu():
        pytest.skip("a GPU is here: the CPU placement does not apply")
    proc = _serve(tmp_path, "--model", export_dir, "--tensor-parallel-size", "2")
    assert proc.returncode == 0, proc.stderr
    env_line, args_line = proc.stdout.splitlines()[-2:]
    cpus = sorted(os.sched_getaffinity(0))
    groups = env_line.split("bind=")[1].split("|")
    assert len(groups) == 2 and sorted(int(c) for g in groups for c in g.split(",")) == cpus[:len(cpus) // 2 * 2]
    assert "host_ip=127.0.0.1" in env_line
    args = args_line.split()
    kv = int(args[args.index("--kv-cache-memory-bytes") + 1])
    free = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))
    assert 0.05 * free < kv < 0.2 * free  # a quarter of what is free, split between the two workers
    fraction = _serve(tmp_path, "--model", export_dir, FEALLM_VLLM_CPU_MEMORY="0.42").stdout.splitlines()[-1].split()
    assert fraction[fraction.index("--gpu-memory-utilization") + 1] == "0.42" and "--kv-cache-memory-bytes" not in fraction
    own = _serve(tmp_path, "--model", export_dir, "--", "--kv-cache-memory-bytes", "123").stdout.splitlines()[-1]
    assert own.count("--kv-cache-memory-bytes") == 1 and own.endswith("--kv-cache-memory-bytes 123")
    bound = _serve(tmp_path, "--model", export_dir, "--tensor-parallel-size", "2", VLLM_CPU_OMP_THREADS_BIND="0-1|0-1")
    assert "bind=0-1|0-1" in bound.stdout  # a binding of one's own is kept
    if len(cpus) < 16:
        many = _serve(tmp_path, "--model", export_dir, "--tensor-parallel-size", "16")
        assert many.returncode == 2 and "need at least 16 cores" in many.stderr


def test_serve_on_a_cpu_refuses_a_head_size_vllm_has_no_cpu_kernel_for(tmp_path, export_dir):
    if _on_gpu():
        pytest.skip("a GPU is here: the CPU attention check does not apply")
    config = json.loads((export_dir / "config.json").read_text())
    config["text_config"]["num_attention_heads"] = 4  # head size 16, the default tiny kit's
    (export_dir / "config.json").write_text(json.dumps(config))
    proc = _serve(tmp_path, "--model", export_dir)
    assert proc.returncode == 2 and "head size 16 has no CPU attention in vLLM" in proc.stderr


def test_serve_refuses_a_folder_that_is_not_an_export(tmp_path, full):
    proc = _serve(tmp_path, "--model", full)
    assert proc.returncode == 2 and f"{full}/config.json: not a feallm export-vllm folder" in proc.stderr
    proc = _serve(tmp_path, "--model", tmp_path / "nowhere")
    assert proc.returncode == 2 and f"{tmp_path / 'nowhere'}/config.json: not found" in proc.stderr
    assert _serve(tmp_path).returncode == 2


@needs_vllm
def test_served_model_answers_a_question_without_an_image(served, exported):
    import openai

    client = openai.OpenAI(base_url=served, api_key="EMPTY", max_retries=0)
    response = client.chat.completions.create(model=str(exported), temperature=0, max_tokens=8,
                                              messages=[{"role": "user", "content": "Hello"}])
    assert response.choices[0].finish_reason in ("stop", "length")


@needs_vllm
def test_served_plain_llava_15_tokens_equal_the_llava_runners(vkit, items, tmp_path):
    from feallm_llava.bench.vllm_serving import vllm_server
    from feallm_llava.recipe import TinyRecipe

    recipe = TinyRecipe(out=tmp_path / "train", kit=vkit.root, data=Path(items[0].image).parents[1], steps1=2,
                        steps2=48, lr2=3e-3, save_steps=100, projector="mlp2x_gelu")
    recipe.run()
    out = tmp_path / "export"
    assert cli(["export-vllm", "--model-path", str(recipe.stage_dir(2)), "--model-base", str(vkit.llm),
                "--out", str(out), "--dtype", "float32"]) == 0
    with vllm_server(out, venv=VLLM_VENV, log=tmp_path / "serve.log", timeout=600,
                     vllm_args=("--dtype", "float32", "--enforce-eager", "--max-model-len", "512")) as base:
        served = _served_token_ids(base, str(out), items[:8])
    assert served == _runner_token_ids(recipe.stage_dir(2), vkit.llm, items[:8])


def test_bench_vllm_without_vllms_environment_says_how_to_make_it(tmp_path, capsys):
    from feallm_llava.bench.__main__ import main as bench

    assert bench(["vllm", "--vllm-venv", str(tmp_path / "none"), "--work-dir", str(tmp_path / "w")]) == 2
    assert "bash launch/bootstrap.sh --env vllm" in capsys.readouterr().err
