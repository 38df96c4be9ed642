"""`python -m feallm_llava.bench video`: `feallm analyze` on synthetic videos of the demo's
held-out subjects, with a trained demo checkpoint.

accuracy: the held-out subjects of a demo run (the subjects of its `fea/eval.json`, the
same identities `write_affwild2` drew for them) are drawn into synthetic videos, two per
video (`data.synthetic_video`: moving, changing expression every 6-10 frames, the demo's
per-frame nuisance). `feallm analyze` samples them, finds the faces (`--detector`, YuNet
by default), aligns each on its 5 landmarks to the template of the demo's training
pictures (`--align synthetic`), tracks them and asks the FER and AUD questions (no
reasoning: the demo trains none); each row is matched to
the face it lies on (IoU > 0.5) and scored against that frame's truth with FEABench's
metrics (`eval.metrics`: FE accuracy, mean F1 over the 12 AUs). Printed beside the
demo's own image accuracy on FEABench (its `eval/feallm/predictions.jsonl`, scored as
`feallm score` does) and what tracking did: faces found per truth face, ids per person.

throughput: frames per second of `feallm analyze --every 1` on one such video, at each
`--batch-sizes` (the same model; both faces of every frame asked).

    python -m feallm_llava.bench video --demo runs/demo                  # both
    python -m feallm_llava.bench video --demo runs/demo --detector haar --align none   # Haar, calibrated crops
    python -m feallm_llava.bench video --demo runs/demo --mode throughput --batch-sizes 1,8
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

EXAMPLES = """\
  python -m feallm_llava.bench video --demo runs/demo                 # after feallm demo (--until eval at least)
  python -m feallm_llava.bench video --demo runs/demo --mode throughput --batch-sizes 1,8 --threads 2"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--demo", default="runs/demo", help="a demo run directory, trained through stage 2")
    parser.add_argument("--mode", choices=("accuracy", "throughput", "both"), default="both")
    parser.add_argument("--out", default=None, help="where videos and results go (default: DEMO/bench-video)")
    parser.add_argument("--frames", type=int, default=60, help="frames per synthetic video (accuracy)")
    parser.add_argument("--fps", type=float, default=10.0, help="frame rate of the synthetic videos")
    parser.add_argument("--every", type=int, default=2, help="analyse every N-th frame (accuracy)")
    parser.add_argument("--face-size", type=int, default=96, help="side of a face picture in the video, pixels")
    parser.add_argument("--detector", default="yunet", help="face detector (serve.detectors.DETECTORS)")
    parser.add_argument("--detector-model", default=None, metavar="FILE.onnx", help="YuNet's ONNX file (yunet-onnx)")
    parser.add_argument("--align", default="synthetic",
                        help="alignment template (serve.align.ALIGNMENTS; synthetic: the demo's training pictures), "
                             "or none: a margin crop around the box (--margin, --crop-shift)")
    parser.add_argument("--margin", type=float, default=None,
                        help="crop margin without alignment (default: calibrated so that the detector's box becomes "
                             "the face picture the demo trained on, measured on training subjects)")
    parser.add_argument("--crop-shift", type=float, default=None,
                        help="crop centre below the box's, in box heights, without alignment (default: calibrated "
                             "with --margin)")
    parser.add_argument("--equalize", choices=("global", "local", "none"), default="local",
                        help="Haar's contrast (global equalisation misses the darkest synthetic skin tones)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call (accuracy)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the demo's eval setting")
    parser.add_argument("--throughput-frames", type=int, default=16, help="frames of the throughput video")
    parser.add_argument("--batch-sizes", default="1,8", help="batch sizes timed (throughput)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per batch size (the best counts)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")


def held_out_subjects(demo: Path) -> list[int]:
    items = json.loads((demo / "fea" / "eval.json").read_text())
    return sorted({int(str(t["subject"]).rsplit("_", 1)[1]) for t in items})


def training_subjects(demo: Path) -> list[int]:
    items = json.loads((demo / "fea" / "train.json").read_text())
    return sorted({int(str(t["image"]).split("/")[0].rsplit("_", 1)[1]) for t in items})


def framing(subjects: list[int], folder: Path, args, seed: int) -> tuple[float, float]:
    """(margin, crop shift) that turn the detector's box into the framing the demo trained on
    (a face's whole picture), measured on training subjects drawn into short videos: the
    median picture / box side ratio and the median offset of the picture's centre below
    the box's, in box heights. The Haar box of a drawn face sits higher and is smaller
    than its picture; crops framed unlike the training pictures cost accuracy."""
    from statistics import median

    from feallm_llava.data.video import Sampling, VideoReader
    from feallm_llava.serve.detectors import make_detector
    from feallm_llava.serve.track import iou

    detector = make_detector(args.detector, model=args.detector_model, equalize=args.equalize)

    ratios, shifts = [], []
    for video in render_videos(subjects, folder, 8, args.fps, args.face_size, seed):
        with VideoReader(video.path) as reader:
            for frame in reader.frames(Sampling(every=1)):
                truth = video.truth_of(frame.index)
                for box in detector.detect(frame.image):
                    b = box.as_tuple()
                    best = max(truth, key=lambda t: iou(b, t["box"]), default=None)
                    if best is not None and on_picture(b, best["box"]):
                        x, y, w, h = best["box"]
                        ratios.append(w / max(b[2], b[3]))
                        shifts.append(((y + h / 2) - (b[1] + b[3] / 2)) / b[3])
    if not ratios:
        raise RuntimeError(f"no face found in the calibration videos under {folder}")
    return max(0.0, (median(ratios) - 1) / 2), median(shifts)


def render_videos(subjects: list[int], folder: Path, frames: int, fps: float, face_size: int, seed: int):
    """Two subjects per video (the last alone when their number is odd)."""
    from feallm_llava.data.synthetic_video import Person, two_people, write_synthetic_video

    videos = []
    for k in range(0, len(subjects), 2):
        pair = subjects[k:k + 2]
        people = (two_people(frames, face_size=face_size, subjects=pair) if len(pair) == 2
                  else [Person(pair[0], (40, 40), (180, 100), seed=seed)])
        people = [Person(p.subject, p.start, p.end, p.hidden, seed) for p in people]
        name = "_".join(f"s{s:03d}" for s in pair)
        videos.append(write_synthetic_video(folder / f"heldout_{name}.mp4", people, frames=frames, fps=fps,
                                            face_size=face_size, seed=seed + 1))
    return videos


def on_picture(box, picture) -> bool:
    """A detection lies on a drawn face when its centre is inside the face's picture and its
    area is 20-150 % of the picture's: the truth is the square picture, and detectors box
    the face inside it (a YuNet box covers about half the picture: IoU alone would miss it)."""
    x, y, w, h = box
    px, py, pw, ph = picture
    cx, cy = x + w / 2, y + h / 2
    return px <= cx <= px + pw and py <= cy <= py + ph and 0.2 <= w * h / (pw * ph) <= 1.5


def score_video_rows(rows: list[dict], videos) -> dict:
    """Rows of `analyze` matched to the truth of their frame and scored like FEABench."""
    from feallm_llava.eval.metrics import au_metrics, fer_metrics
    from feallm_llava.facs.labels import AUS, au_key
    from feallm_llava.serve.track import iou

    gt_expr, pred_expr, gt_aus, pred_aus = [], [], [], []
    ids: dict[tuple[str, int], Counter] = {}
    truth_faces = 0
    seen: set[tuple[str, int, int]] = set()   # (video, frame, person) with a detection: a face twice counts once
    sampled = {(str(r["input"]), int(r["frame"])) for r in rows if r["frame"] is not None}
    for video in videos:
        truth_faces += sum((str(video.path), t["frame"]) in sampled for t in video.truth)
    for r in rows:
        if r["face_id"] is None or r["frame"] is None or r["error"]:
            continue
        video = next(v for v in videos if str(v.path) == str(r["input"]))
        box = tuple(int(r[k]) for k in ("face_x", "face_y", "face_w", "face_h"))
        truth = [t for t in video.truth_of(int(r["frame"])) if on_picture(box, t["box"])]
        if not truth:
            continue   # a detection on no drawn face
        t = max(truth, key=lambda t: iou(box, t["box"]))
        seen.add((str(video.path), int(r["frame"]), t["person"]))
        ids.setdefault((str(video.path), t["person"]), Counter())[int(r["face_id"])] += 1
        gt_expr.append(t["expression"])
        pred_expr.append(r["expression"] or None)
        gt_aus.append(t["aus"])
        known = [r[au_key(au)] for au in AUS]
        pred_aus.append(None if all(v is None for v in known) else [au for au, v in zip(AUS, known) if v == 1])
    fe, au = fer_metrics(gt_expr, pred_expr), au_metrics(gt_aus, pred_aus, AUS)
    switches = sum(len(c) - 1 for c in ids.values())
    majority = sum(c.most_common(1)[0][1] for c in ids.values())
    return {"face_frames_scored": len(gt_expr), "truth_face_frames": truth_faces,
            "found": len(seen) / truth_faces if truth_faces else 0.0,
            "fe_accuracy": fe.accuracy, "fe_parse_failures": fe.parse_failures, "mean_au_f1": au.mean_f1,
            "au_f1": {au_key(a): f for a, f in au.f1.items()}, "people": len(ids),
            "extra_ids": switches, "rows_on_majority_id": majority / max(1, sum(sum(c.values()) for c in ids.values()))}


def image_reference(demo: Path) -> dict | None:
    """The demo's FEABench image scores, from its eval predictions (as `feallm score` scores them)."""
    from feallm_llava.eval.score import score_files

    path = demo / "eval" / "feallm" / "predictions.jsonl"
    if not path.is_file():
        return None
    rows, _failures = score_files([path])
    row = rows[0]
    return {"fe_accuracy": row.fer.accuracy, "mean_au_f1": row.aud.mean_f1, "items": row.fer.n}


def _backend(demo: Path, max_new_tokens: int):
    from feallm_llava.serve.analyze import load_backend

    checkpoint = demo / "train" / "llava-tiny-feallm-lora"
    if not checkpoint.is_dir():
        from feallm_llava.errors import UsageError

        raise UsageError(f"{checkpoint}: no stage-2 checkpoint; run `feallm demo --out {demo} --until eval` first")
    return load_backend(str(checkpoint), str(demo / "llm"), device="cpu", max_new_tokens=max_new_tokens)


def accuracy(args, demo: Path, out: Path, backend, seed: int) -> dict:
    from feallm_llava.serve.analyze import analyze
    from feallm_llava.serve.rows import plain_rows

    subjects = held_out_subjects(demo)
    videos = render_videos(subjects, out / "videos", args.frames, args.fps, args.face_size, seed)
    t0 = time.perf_counter()
    frame = analyze([v.path for v in videos], backend=backend, every=args.every, reasoning="none",
                    margin=args.margin, crop_shift=args.crop_shift, equalize=args.equalize,
                    detector=args.detector, detector_model=args.detector_model, align=args.align,
                    batch_size=args.batch_size, progress=True)
    seconds = time.perf_counter() - t0
    rows = plain_rows(frame)
    (out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = score_video_rows(rows, videos)
    scores.update(subjects=[f"synth_{s:03d}" for s in subjects], videos=[str(v.path) for v in videos],
                  seconds=round(seconds, 1), every=args.every, equalize=args.equalize,
                  detector=frame.attrs.get("detector"), align=frame.attrs.get("align"))
    return scores


def throughput(args, out: Path, backend, seed: int, subjects: list[int]) -> list[dict]:
    from feallm_llava.data.synthetic_video import two_people, write_synthetic_video
    from feallm_llava.serve.analyze import analyze

    video = write_synthetic_video(out / "throughput.mp4",
                                  two_people(args.throughput_frames, face_size=args.face_size, subjects=subjects[:2]),
                                  frames=args.throughput_frames, fps=args.fps, face_size=args.face_size, seed=seed)
    results = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            frame = analyze(video.path, backend=backend, every=1, reasoning="none", margin=args.margin,
                            crop_shift=args.crop_shift, detector=args.detector, detector_model=args.detector_model,
                            align=args.align, equalize=args.equalize, batch_size=batch, progress=False)
            times.append(time.perf_counter() - t0)
        faces = int(frame["face_id"].notna().sum())
        best = min(times)
        results.append({"batch_size": batch, "frames": args.throughput_frames, "face_rows": faces,
                        "seconds": [round(t, 2) for t in times], "frames_per_s": args.throughput_frames / best,
                        "faces_per_s": faces / best})
    return results


def main(args: argparse.Namespace) -> int:
    import torch

    demo = Path(args.demo)
    out = Path(args.out) if args.out else demo / "bench-video"
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    config = json.loads((demo / "feallm_demo.json").read_text()) if (demo / "feallm_demo.json").is_file() else {}
    seed = int(config.get("seed", 0))
    max_new_tokens = args.max_new_tokens or int(config.get("eval_max_new_tokens", 160))
    backend = _backend(demo, max_new_tokens)
    report: dict = {"demo": str(demo), "max_new_tokens": max_new_tokens, "threads": args.threads}
    if args.align != "none":
        args.margin = 0.25 if args.margin is None else args.margin   # only faces without landmarks use it
        args.crop_shift = 0.0 if args.crop_shift is None else args.crop_shift
        print(f"detector {args.detector}, faces aligned to the {args.align} template")
    elif args.margin is None or args.crop_shift is None:
        margin, shift = framing(training_subjects(demo)[:8], out / "calibration", args, seed)
        args.margin = round(margin, 3) if args.margin is None else args.margin
        args.crop_shift = round(shift, 3) if args.crop_shift is None else args.crop_shift
        print(f"detector {args.detector}, crop margin {args.margin}, crop shift {args.crop_shift} (calibrated on "
              f"8 training subjects)")
    report.update(detector=args.detector, align=args.align, margin=args.margin, crop_shift=args.crop_shift)
    if args.mode in ("accuracy", "both"):
        report["images"] = image_reference(demo)
        report["video"] = accuracy(args, demo, out, backend, seed)
        v, i = report["video"], report["images"]
        print(f"held-out subjects {', '.join(v['subjects'])}; {len(v['videos'])} video(s), every {args.every}-th "
              f"frame of {args.frames} at {args.fps:g} fps; {v['seconds']} s")
        print(f"faces found: {v['face_frames_scored']} of {v['truth_face_frames']} face-frames "
              f"({100 * v['found']:.1f} %); {v['people']} people, {v['extra_ids']} extra id(s), "
              f"{100 * v['rows_on_majority_id']:.1f} % of rows on their person's id")
        print("                 FE acc   mean AU F1")
        if i:
            print(f"images (FEABench) {100 * i['fe_accuracy']:6.2f}   {100 * i['mean_au_f1']:6.2f}   "
                  f"({i['items']} items)")
        print(f"video frames      {100 * v['fe_accuracy']:6.2f}   {100 * v['mean_au_f1']:6.2f}   "
              f"({v['face_frames_scored']} face-frames)")
        if i:
            gap = max(i["fe_accuracy"] - v["fe_accuracy"], i["mean_au_f1"] - v["mean_au_f1"])
            print(f"largest shortfall against the images: {100 * gap:.2f} points "
                  f"({'within' if gap <= 0.10 else 'NOT within'} 10)")
        print(f"held-out subjects found in {100 * v['found']:.1f} % of their sampled frames with {args.detector} "
              f"(target >= 95 %: {'met' if v['found'] >= 0.95 else 'NOT met'})")
    if args.mode in ("throughput", "both"):
        report["throughput"] = throughput(args, out, backend, seed, held_out_subjects(demo))
        for r in report["throughput"]:
            print(f"--every 1, batch {r['batch_size']:>2}: {r['frames_per_s']:.2f} frames/s, {r['faces_per_s']:.2f} "
                  f"faces/s ({r['frames']} frames, {r['face_rows']} face rows; runs {r['seconds']} s)")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'report.json'}")
    return 0
