"""`feallm demo`: the offline end-to-end FEALLM run on synthetic FACS faces.

What `bash launch/demo.sh` runs. On data where the truth is known, through the real
components:

  1. synthetic   faces drawn from FACS AUs, written in Aff-Wild2's native layout
  2. dataset     `feallm build-dataset --annotator template --wording fixed` (the real
                 reader + builder)
  3. kit         the offline tiny kit (tokenizer, Llama, 24-layer CLIP)
  4. warmup      text-only warm-up of the tiny random LLM (stands in for Vicuna's
                 pretraining; it never sees an image)
  5. stage1      `llava.train.train_mem --mm_projector_type feallm --tune_mm_mlp_adapter`
                 on LCS-558K-style captions of the training faces
     readout     the stage-1 checkpoint captions the held-out faces; the captions are
                 parsed back and scored (what stage 1 alone taught the projector)
  6. stage2      the same script with LoRA on the FEA instruction set
  7. eval        `feallm eval --bench feabench --scores` on held-out subjects, and on a
                 validation split (unused frames of the training subjects)
  8. score       `feallm score --tune-on`: table (text and probability rows), confusion
                 matrix, per-AU F1 plot, reliability diagram
  9. analyze     `feallm analyze` on a held-out face, and on a real photo (astronaut),
                 labelled out of domain: the toy model knows cartoon faces only

Every stage leaves a marker; an interrupted run continues with `--resume` from the last
finished stage. Every number printed is a result of this run on synthetic data, never
a paper figure.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from feallm_llava.demo.config import DemoConfig
from feallm_llava.demo.rundir import Run
from feallm_llava.errors import FeallmError, UsageError
from feallm_llava.recipe import TinyRecipe

BANNER = "SYNTHETIC-DATA RESULT OF THIS RUN (tiny model, toy scale; not a paper figure)"
# The real photo only shows the pipeline working on one: the toy model saw cartoon faces only.
OUT_OF_DOMAIN = ("OUT OF DOMAIN: this tiny demo model was trained on synthetic cartoon faces only; its "
                 "expression and AUs for a real photo are not a reading of that face")
# Cores the demo uses: training threads and the processes drawing the synthetic faces.
_CORES = min(2, os.cpu_count() or 1)
STAGES = ("synthetic", "dataset", "kit", "warmup", "stage1", "readout", "stage2", "eval", "score", "analyze")


EXAMPLES = """\
  feallm demo                                   # runs/demo: about 10 minutes on 2 CPU cores
  feallm demo --out runs/demo2 --seed 1 --compare-baseline
  feallm demo --resume --out runs/demo          # continue an interrupted run"""
INTERRUPTED = "every finished stage is kept; continue with --resume and the same --out"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument("--out", default="runs/demo", help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--subjects", type=int, default=d.subjects, help="synthetic identities")
    parser.add_argument("--frames", type=int, default=d.frames, help="frames per identity")
    parser.add_argument("--steps", default=f"{d.warmup_steps},{d.steps1},{d.steps2}",
                        help="warm-up,stage-1,stage-2 training steps")
    parser.add_argument("--llm", choices=["tiny"], default=d.llm,
                        help="the LLM: the offline tiny kit's Llama (text-warmed)")
    parser.add_argument("--compare-baseline", action="store_true",
                        help="also train upstream's mlp2x_gelu projector with the same budget")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the faces, the split and training")
    parser.add_argument("--until", choices=STAGES, default=None,
                        help="stop after this stage (continue later with --resume)")


def _cli(*argv: str) -> None:
    from feallm_llava.cli import main

    code = main([str(a) for a in argv])
    if code:
        error = FeallmError(f"`feallm {' '.join(map(str, argv))}` failed with exit status {code}")
        error.exit_code = code
        raise error


def _write_captions(aw: Path, train_json: Path, out_json: Path) -> None:
    """Stage-1 data in LCS-558K's format: one caption per training face."""
    from feallm_llava.data.affwild2 import read_affwild2
    from feallm_llava.data.synthetic import caption

    images_root = aw / "cropped_aligned"
    wanted = {s["image"] for s in json.loads(train_json.read_text())}
    samples = []
    for rec in read_affwild2(aw):
        rel = Path(rec.image).relative_to(images_root).as_posix()
        if rel in wanted and rec.expression is not None:
            samples.append({"id": f"cap-{rec.id}", "image": rel, "conversations": [
                {"from": "human", "value": "<image>\n"},
                {"from": "gpt", "value": caption(rec.active_aus, rec.expression)}]})
    out_json.write_text(json.dumps(samples))


def _recipe(run: Run, projector: str) -> TinyRecipe:
    """The tiny training recipe on this run's kit, warmed-up LLM and instruction set."""
    c, out = run.cfg, run.out
    return TinyRecipe(
        out=out / "train", kit=out / "kit", model=out / "llm", data=out / "fea",
        stage1_json=out / "fea" / "pretrain.json", stage2_json=out / "fea" / "train.json",
        image_folder=out / "affwild2" / "cropped_aligned",
        steps1=c.steps1, steps2=c.steps2, batch=c.batch, lora_r=c.lora_r, lora_alpha=2 * c.lora_r,
        lr1=c.lr1, lr2=c.lr2, projector_lr=c.projector_lr, save_steps=max(c.steps1, c.steps2) // 2 or 1,
        log_steps=25,  # logging every step cost 4 % of a stage-2 step
        projector=projector,
        feallm_flags=f"--mm_feallm_crop_size {c.crop_size} --mm_feallm_lca_pool {c.lca_pool} --mm_feallm_mpp_dim 0")


def _checkpoint(run: Run, projector: str, stage: int = 2) -> Path:
    return _recipe(run, projector).stage_dir(stage)


def _readout(run: Run, projector: str) -> None:
    """What stage 1 taught the projector: the caption the stage-1 checkpoint writes for each
    held-out face (upstream's `plain` template, as it was trained), read with the one
    parser (`facs.parse`) and scored like FEABench."""
    from feallm_llava.eval.items import EvalItem
    from feallm_llava.eval.metrics import au_metrics, fer_metrics
    from feallm_llava.facs.labels import AUS
    from feallm_llava.facs.parse import parse
    from feallm_llava.inference.llava_runner import LlavaBackend

    truth = [t for t in json.loads((run.out / "fea" / "eval.json").read_text()) if t.get("expression")]
    images = run.out / "affwild2" / "cropped_aligned"
    items = [EvalItem(id=t["id"], image=str(images / t["image"]), task="fer", question="",
                      bench="synthetic-captions", gt_expression=t["expression"]) for t in truth]
    backend = LlavaBackend(str(_checkpoint(run, projector, 1)), str(run.out / "llm"),
                           device="cpu", max_new_tokens=48)  # the checkpoint records `plain`
    captions = {item.id: text for item, text in backend.answer(items, batch_size=16)}
    rows = []
    for t in truth:
        read = parse(captions[t["id"]], AUS)
        rows.append({"id": t["id"], "caption": captions[t["id"]], "pred_expression": read.expression,
                     "pred_aus": sorted(read.aus), "gt_expression": t["expression"], "gt_aus": t.get("aus")})
    fe = fer_metrics([r["gt_expression"] for r in rows], [r["pred_expression"] for r in rows])
    with_aus = [r for r in rows if r["gt_aus"] is not None]
    au = au_metrics([r["gt_aus"] for r in with_aus], [r["pred_aus"] for r in with_aus], AUS)
    out = run.out / "readout" / projector
    out.mkdir(parents=True, exist_ok=True)
    (out / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "scores.json").write_text(json.dumps({"fe_accuracy": fe.accuracy, "mean_au_f1": au.mean_f1,
                                                 "au_f1": {str(k): v for k, v in au.f1.items()},
                                                 "items": len(rows)}, indent=2))


def _eval(run: Run, projector: str) -> None:
    """FEABench on the held-out subjects, with probabilities (`--scores`), and the same on
    the validation split (unused frames of the training subjects), where `feallm score`
    tunes the per-AU thresholds."""
    from feallm_llava.eval.validation_split import write_validation_split

    val = run.out / "fea" / "val.json"
    if not val.exists():
        write_validation_split(run.out / "affwild2", run.out / "fea", val, run.cfg.eval_size, run.cfg.seed)
    for data, out in ((run.out / "fea" / "eval.json", run.out / "eval" / projector),
                      (val, run.out / "eval" / f"{projector}-val")):
        _cli("eval", "--bench", "feabench", "--data", data,
             "--model-path", _checkpoint(run, projector), "--model-base", run.out / "llm",
             "--device", "cpu", "--batch-size", "16", "--scores",
             "--max-new-tokens", run.cfg.eval_max_new_tokens, "--seed", run.cfg.seed, "--out", out)


def _names(run: Run) -> list[tuple[str, str]]:
    rows = [("feallm", "FEALLM (tiny, synthetic)")]
    if run.cfg.compare_baseline:
        rows.insert(0, ("mlp2x_gelu", "LLaVA mlp2x_gelu w/ LoRA (tiny, synthetic)"))
    return rows


def _score(run: Run) -> None:
    rows = _names(run)
    _cli("score", *[run.out / "eval" / p / "predictions.jsonl" for p, _ in rows],
         "--tune-on", *[run.out / "eval" / f"{p}-val" / "predictions.jsonl" for p, _ in rows],
         "--out", run.out / "report", "--name", *[n for _, n in rows])


def _analyze(run: Run) -> None:
    eval_items = json.loads((run.out / "fea" / "eval.json").read_text())
    face = run.out / "affwild2" / "cropped_aligned" / eval_items[0]["image"]
    common = ["--model-path", _checkpoint(run, "feallm"), "--model-base", run.out / "llm",
              "--device", "cpu", "--max-new-tokens", run.cfg.eval_max_new_tokens,
              "--no-progress", "--resume"]
    _cli("analyze", face, "--no-detect", "--out", run.out / "analyze" / "held_out_face.csv", *common)
    try:
        from skimage import data as skdata
    except ImportError:
        print("   scikit-image is not installed: skipping the astronaut photo (pip install scikit-image)")
        return
    from PIL import Image

    photo = run.out / "analyze" / "astronaut.png"
    Image.fromarray(skdata.astronaut()).save(photo)
    print(f"   {OUT_OF_DOMAIN}")
    # YuNet's landmarks align the face to where the demo's training pictures have their eyes,
    # nose and mouth (the synthetic template), the framing this model learned
    _cli("analyze", photo, "--out", run.out / "analyze" / "astronaut.csv", "--detector", "yunet",
         "--align", "synthetic", "--annotate", run.out / "analyze" / "astronaut_annotated.png",
         "--note", OUT_OF_DOMAIN, *common)


def _summary(run: Run) -> None:
    report = run.out / "report"
    print(f"\n{'=' * len(BANNER)}\n{BANNER}\n{'=' * len(BANNER)}")
    print((report / "table.md").read_text())
    truth = json.loads((run.out / "fea" / "eval.json").read_text())
    print(f"held-out synthetic subjects: {len(sorted({t['subject'] for t in truth}))}, images: {len(truth)}")
    print(_chance_line(truth))
    _print_readouts(run)
    for name in ("scores.json", "scores.csv", "table.md", "confusion.png", "au_f1.png", "reliability.png"):
        if (report / name).exists():
            print(f"  {report / name}")
    for csv in sorted((run.out / "analyze").glob("*")):
        print(f"  {csv}" + ("   <- OUT OF DOMAIN for this toy model" if "astronaut" in csv.name else ""))
    print("\nstage times:")
    for name, seconds, cached in run.times:
        print(f"  {seconds:7.1f} s  {name}{'  (earlier run)' if cached else ''}")
    print(f"  {sum(s for _, s, _ in run.times):7.1f} s  total")


def _print_readouts(run: Run) -> None:
    for projector, name in _names(run):
        scores = run.out / "readout" / projector / "scores.json"
        if scores.exists():
            r = json.loads(scores.read_text())
            print(f"stage-1 readout of {name} (its own captions of the same faces, parsed): "
                  f"FE {100 * r['fe_accuracy']:.2f}, mean AU F1 {100 * r['mean_au_f1']:.2f}")


def blind_baselines(truth: list[dict]) -> dict:
    """What a model blind to the image scores on these items, to read results against.

    FE: always the most frequent expression (`fe`, `fe_label`). AU: every AU always on
    (`au`), whose F1 is 2p / (1 + p) at prevalence p, well above 0 for frequent AUs.
    A key is None when the items carry no such labels.
    """
    from collections import Counter

    from feallm_llava.eval.metrics import au_metrics
    from feallm_llava.facs.labels import AUS

    fer = [t["expression"] for t in truth if t.get("expression")]
    aud = [t["aus"] for t in truth if t.get("aus") is not None]
    label, count = Counter(fer).most_common(1)[0] if fer else (None, 0)
    return {"fe": count / len(fer) if fer else None, "fe_label": label,
            "au": au_metrics(aud, [AUS] * len(aud), AUS).mean_f1 if aud else None}


def _chance_line(truth: list[dict]) -> str:
    b = blind_baselines(truth)
    parts = []
    if b["fe"] is not None:
        parts.append(f"FE {100 * b['fe']:.2f} (always {b['fe_label']})")
    if b["au"] is not None:
        parts.append(f"mean AU F1 {100 * b['au']:.2f} (every AU always on)")
    return "blind baselines on these items: " + ", ".join(parts)


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    try:
        warm, s1, s2 = (int(x) for x in str(args.steps).split(","))
    except ValueError:
        raise UsageError(f"--steps wants three integers 'warmup,stage1,stage2', got {args.steps!r}") from None
    return DemoConfig(subjects=args.subjects, frames=args.frames, warmup_steps=warm, steps1=s1, steps2=s2,
                      llm=args.llm, compare_baseline=args.compare_baseline, seed=args.seed)


def run_demo(out: Path, cfg: DemoConfig, resume: bool = False, until: str | None = None) -> Run:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Tiny tensors: two threads at most, set before torch is first imported here (the
    # training subprocesses inherit it); more threads than cores fight, up to 10x slower.
    os.environ.setdefault("OMP_NUM_THREADS", str(_CORES))
    run = Run(out.resolve(), cfg, resume, until)
    o = run.out
    from feallm_llava.data.synthetic import write_affwild2
    from feallm_llava.demo.warmup import warm_up
    from feallm_llava.tinykit import KitSpec, build_kit

    run.stage("synthetic", f"{cfg.subjects} synthetic identities x {cfg.frames} frames (Aff-Wild2 layout)",
              lambda: write_affwild2(o / "affwild2", cfg.subjects, cfg.frames, cfg.seed, cfg.image_size,
                                    workers=_CORES))

    def dataset() -> None:
        _cli("build-dataset", "--source", "affwild2", "--root", o / "affwild2", "--out", o / "fea",
             "--annotator", "template", "--seed", cfg.seed, "--train-size", cfg.train_size,
             "--eval-size", cfg.eval_size, "--types", cfg.types, "--wording", cfg.wording, "--no-progress")
        _write_captions(o / "affwild2", o / "fea" / "train.json", o / "fea" / "pretrain.json")

    run.stage("dataset", "FEA instruction set (template annotator) + stage-1 captions", dataset)
    run.stage("kit", "offline tiny kit", lambda: build_kit(o / "kit", KitSpec(image_size=cfg.image_size, seed=cfg.seed)))
    run.stage("warmup", f"text-only warm-up of the tiny LLM ({cfg.warmup_steps} steps; no images)",
              lambda: warm_up(o / "kit" / "llm", [o / "fea" / "train.json", o / "fea" / "pretrain.json"], o / "llm",
                              steps=cfg.warmup_steps, seed=cfg.seed))
    for projector, _ in _names(run):
        run.stage(f"stage1-{projector}", f"stage 1 through llava.train.train_mem, --mm_projector_type {projector}",
                  lambda p=projector: _recipe(run, p).run((1,)))
        run.stage(f"readout-{projector}", f"stage-1 readout: captions of the held-out faces ({projector})",
                  lambda p=projector: _readout(run, p))
        run.stage(f"stage2-{projector}", f"stage 2 (LoRA) through llava.train.train_mem, {projector}",
                  lambda p=projector: _recipe(run, p).run((2,)))
        run.stage(f"eval-{projector}", f"feallm eval --bench feabench ({projector})", lambda p=projector: _eval(run, p))
    run.stage("score", "feallm score", lambda: _score(run))
    run.stage("analyze", "feallm analyze: a held-out face and a real photo", lambda: _analyze(run))
    if run.stopped and not run.done("analyze"):
        print(f"\nstopped after --until {until}; continue with --resume --out {run.out}")
        _print_readouts(run)
        return run
    _summary(run)
    return run


def main(args: argparse.Namespace) -> int:
    run_demo(Path(args.out), config_from_args(args), resume=args.resume, until=args.until)
    return 0
