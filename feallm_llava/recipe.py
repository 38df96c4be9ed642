"""The tiny training recipe: FEALLM's two stages on CPU through upstream's own train script.

Both stages run `python -m llava.train.train_mem --mm_projector_type feallm ...` in a
child process, as a user runs it: stage 1 (`--version plain --tune_mm_mlp_adapter`)
trains the projector, stage 2 (`--version v1 --lora_enable`) LoRA on the LLM with the
projector at its own learning rate, the same flags as `launch/pretrain.sh` and
`launch/finetune_lora.sh`, scaled down to the offline tiny kit. A stage whose output
exists is skipped; an interrupted stage resumes from its last complete checkpoint.

    feallm train-tiny --out runs/tiny                       # kit and sample data made if missing
    bash launch/tiny_cpu.sh                                 # the same, configured by environment

`feallm demo` trains with it; `launch/tiny_cpu.sh` maps its environment onto the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from feallm_llava.errors import FeallmError, UsageError

STAGES = (1, 2)


def _opt(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TinyRecipe:
    out: Path
    kit: Path | None = _opt(None, "the offline tiny kit (default OUT/kit; built when missing)")
    model: Path | None = _opt(None, "the LLM, --model_name_or_path (default KIT/llm); may be a LLaVA checkpoint")
    vision: Path | None = _opt(None, "the CLIP tower (default KIT/clip)")
    data: Path | None = _opt(None, "sample data folder (default OUT/data; written when missing)")
    stage1_json: Path | None = _opt(None, "stage-1 data, LLaVA JSON (default DATA/pretrain.json)")
    stage2_json: Path | None = _opt(None, "stage-2 data, LLaVA JSON (default DATA/finetune.json)")
    image_folder: Path | None = _opt(None, "image root of both (default DATA/images)")
    steps1: int = _opt(4, "stage-1 steps")
    steps2: int = _opt(4, "stage-2 steps")
    batch: int = _opt(4, "per-device batch")
    lora_r: int = _opt(16, "LoRA rank")
    lora_alpha: int = _opt(32, "LoRA alpha")
    lr1: float = _opt(1e-3, "stage 1: the projector's (LCA + MPP) learning rate")
    lr2: float = _opt(2e-4, "stage 2: LoRA's learning rate")
    projector_lr: float = _opt(2e-5, "stage 2: the projector's own learning rate")
    save_steps: int = _opt(2, "a checkpoint every N steps (a rerun resumes from the last)")
    log_steps: int = _opt(1, "a loss line every N steps")
    projector: str = _opt("feallm", "--mm_projector_type (feallm, or an upstream one such as mlp2x_gelu)")
    feallm_flags: str = _opt("--mm_feallm_crop_size 32 --mm_feallm_mpp_dim 0",
                             "--mm_feallm_* flags of both stages (feallm only)")
    stage1_args: str = _opt("", "more train_mem flags for stage 1 (later flags win)")
    stage2_args: str = _opt("", "more train_mem flags for stage 2")
    seed: int = _opt(0, "--seed and --data_seed")

    @property
    def kit_dir(self) -> Path:
        return Path(self.kit or self.out / "kit")

    @property
    def data_dir(self) -> Path:
        return Path(self.data or self.out / "data")

    def stage_dir(self, stage: int) -> Path:
        """Where stage 1 / 2 saves: llava-tiny-<projector>-pretrain / -lora under OUT."""
        return self.out / f"llava-tiny-{self.projector}-{'pretrain' if stage == 1 else 'lora'}"

    def finished(self, stage: int) -> bool:
        weights = "mm_projector.bin" if stage == 1 else "non_lora_trainables.bin"
        return (self.stage_dir(stage) / weights).is_file()

    def _common(self) -> list[str]:
        feallm = shlex.split(self.feallm_flags) if self.projector == "feallm" else []
        return [
            "--vision_tower", str(self.vision or self.kit_dir / "clip"), "--mm_projector_type", self.projector,
            *feallm,
            "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
            "--image_folder", str(self.image_folder or self.data_dir / "images"),
            "--image_aspect_ratio", "pad", "--lazy_preprocess", "True",
            "--per_device_train_batch_size", str(self.batch), "--gradient_accumulation_steps", "1",
            "--num_train_epochs", "1", "--weight_decay", "0.", "--warmup_ratio", "0.03",
            "--lr_scheduler_type", "cosine", "--logging_steps", str(self.log_steps),
            "--save_strategy", "steps", "--save_steps", str(self.save_steps), "--save_total_limit", "2",
            "--model_max_length", "512", "--dataloader_num_workers", "0", "--report_to", "none",
            "--use_cpu", "True", "--seed", str(self.seed), "--data_seed", str(self.seed),
        ]

    def stage_argv(self, stage: int, python: str = sys.executable) -> list[str]:
        """The train_mem command of stage 1 or 2."""
        model = str(self.model or self.kit_dir / "llm")
        head = [python, "-m", "llava.train.train_mem", "--model_name_or_path", model]
        if stage == 1:
            own = ["--version", "plain", "--data_path", str(self.stage1_json or self.data_dir / "pretrain.json"),
                   "--tune_mm_mlp_adapter", "True", "--learning_rate", str(self.lr1),
                   "--max_steps", str(self.steps1), "--output_dir", str(self.stage_dir(1))]
            extra = self.stage1_args
        elif stage == 2:
            own = ["--version", "v1", "--data_path", str(self.stage2_json or self.data_dir / "finetune.json"),
                   "--pretrain_mm_mlp_adapter", str(self.stage_dir(1) / "mm_projector.bin"),
                   "--lora_enable", "True", "--lora_r", str(self.lora_r), "--lora_alpha", str(self.lora_alpha),
                   "--mm_projector_lr", str(self.projector_lr), "--learning_rate", str(self.lr2),
                   "--max_steps", str(self.steps2), "--output_dir", str(self.stage_dir(2))]
            extra = self.stage2_args
        else:
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        return head + own + self._common() + shlex.split(extra)

    def prepare(self) -> None:
        """The tiny kit and the sample data, when the run has none of its own."""
        from feallm_llava.tinykit import build_kit, write_sample_data

        if not (self.kit_dir / "kit.json").is_file():
            build_kit(self.kit_dir)
        if self.stage1_json is None and not (self.data_dir / "pretrain.json").is_file():
            write_sample_data(self.data_dir)

    def run(self, stages=STAGES, python: str = sys.executable, env: dict | None = None) -> None:
        """Run the stages not yet finished; a failed stage raises CalledProcessError."""
        self.prepare()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        # tiny tensors: one thread unless told otherwise (two threads fighting over two
        # cores were up to 10x slower)
        env.setdefault("OMP_NUM_THREADS", "1")
        for stage in stages:
            if self.finished(stage):
                continue
            print(f"[tiny] stage {stage}: {'projector alignment' if stage == 1 else 'LoRA finetune'} "
                  f"-> {self.stage_dir(stage)}", flush=True)
            subprocess.run(self.stage_argv(stage, python), env=env, check=True)
        print(f"[tiny] stage 1: {self.stage_dir(1)}\n[tiny] stage 2: {self.stage_dir(2)}  "
              f"(load with model_base={self.model or self.kit_dir / 'llm'})", flush=True)


EXAMPLES = """\
  feallm train-tiny --out runs/tiny --steps1 20 --steps2 20
  feallm analyze face.jpg --no-detect --model-path runs/tiny/llava-tiny-feallm-lora --model-base runs/tiny/kit/llm"""
INTERRUPTED = "a rerun skips finished stages and resumes the interrupted one from its last checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/tiny"), help="run folder")
    parser.add_argument("--stages", default="1 2", help="which stages to run: '1', '2' or '1 2'")
    for f in dataclasses.fields(TinyRecipe):
        if f.name == "out":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = Path if "Path" in str(f.type) else {"int": int, "float": float}.get(str(f.type), str)
        parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"])


def recipe_from_args(args: argparse.Namespace) -> TinyRecipe:
    return TinyRecipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TinyRecipe)})


def main(args: argparse.Namespace) -> int:
    try:
        stages = tuple(int(s) for s in args.stages.replace(",", " ").split())
    except ValueError:
        stages = ()
    if not stages or any(s not in STAGES for s in stages):
        raise UsageError(f"--stages takes 1 and/or 2, got {args.stages!r}")
    try:
        recipe_from_args(args).run(stages)
    except subprocess.CalledProcessError as err:
        raise FeallmError(f"a training stage failed (exit status {err.returncode}; its log is above)") from None
    return 0
