"""`python -m feallm_llava.bench detect`: every available face detector on synthetic group
pictures of five skin tones: recall per tone, false positives, landmark error after
alignment, time per picture at one thread.

Pictures come from `data.synthetic_scene` (640 x 480, 3-4 faces 45-140 px wide, up to 6
degrees of roll, lighting gain, noise, clutter; tones cycled so every tone has the same
number of faces). A detection hits a face when their boxes overlap by IoU >= `--iou`
(0.5), matched greedily by IoU; an unmatched detection is a false positive. For a hit
with landmarks, the face is aligned as `feallm analyze` aligns it (the affwild2 template,
112 px) and the true points are mapped through the same transform: the landmark error is
the median distance between the detected and the true points there (pixels of the
112-px crop; the template's eyes are 35 px apart), the residual roll the median angle of
the true eye line in the aligned crop. Time: the best of `--repeats` calls per picture,
averaged over the pictures, with OpenMP and OpenCV at one thread.

Verdict (the default detector): every tone's recall >= 95 %, the worst tone within 3
points of the best, and no more than 1.5x the Haar cascade's time per picture.

    python -m feallm_llava.bench detect                       # 60 pictures, every detector installed
    python -m feallm_llava.bench detect --pictures 20 --detectors yunet,haar
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from statistics import mean, median

EXAMPLES = """\
  python -m feallm_llava.bench detect                     # every detector installed, 60 pictures
  python -m feallm_llava.bench detect --detectors yunet-onnx,haar --detector-model face_detection_yunet_2023mar.onnx"""

# name -> (detector name, options): Haar twice, with the contrast `feallm analyze` gives it
# by default and with CLAHE
VARIANTS = {"yunet": ("yunet", {}), "yunet-onnx": ("yunet-onnx", {}), "haar": ("haar", {"equalize": "global"}),
            "haar-clahe": ("haar", {"equalize": "local"})}
MIN_RECALL, MAX_SPREAD, MAX_TIME_RATIO = 0.95, 0.03, 1.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pictures", type=int, default=60, help="synthetic 640x480 pictures (3-4 faces each)")
    parser.add_argument("--seed", type=int, default=0, help="first picture's seed")
    parser.add_argument("--detectors", default=None,
                        help=f"comma-separated, of {', '.join(VARIANTS)} (default: every one installed; "
                             f"yunet-onnx only with --detector-model)")
    parser.add_argument("--detector-model", default=None, metavar="FILE.onnx", help="YuNet's ONNX file (yunet-onnx)")
    parser.add_argument("--iou", type=float, default=0.5, help="box overlap a hit needs")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per picture (the best counts)")
    parser.add_argument("--out", default=None, help="report.json here (default: print only)")
    parser.add_argument("--measure-synthetic-template", action="store_true",
                        help="instead: print where YuNet finds the 5 points on the demo's 112-px training pictures "
                             "(serve.align's synthetic template)")


def chosen(args) -> list[str]:
    from feallm_llava.serve.yunet import yuface_available

    if args.detectors:
        names = [n.strip() for n in args.detectors.split(",") if n.strip()]
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise ValueError(f"--detectors: unknown {', '.join(unknown)}; use {', '.join(VARIANTS)}")
        return names
    names = (["yunet"] if yuface_available() else []) + (["yunet-onnx"] if args.detector_model else [])
    return names + ["haar", "haar-clahe"]


def match(boxes, faces, min_iou: float) -> tuple[dict[int, object], int]:
    """({face index: detection}, false positives): greedy by IoU, each used once."""
    from feallm_llava.serve.track import iou

    pairs = sorted(((iou(b.as_tuple(), f.box), i, j) for i, b in enumerate(boxes) for j, f in enumerate(faces)),
                   reverse=True)
    hits, used = {}, set()
    for overlap, i, j in pairs:
        if overlap < min_iou:
            break
        if i not in used and j not in hits:
            hits[j] = boxes[i]
            used.add(i)
    return hits, len(boxes) - len(used)


def landmark_error(detected, truth) -> tuple[float, float]:
    """(median point distance, |roll| of the true eyes) in the affwild2-aligned crop."""
    import numpy as np

    from feallm_llava.serve.align import similarity, template, transform

    m = similarity(np.asarray(detected), np.asarray(template("affwild2").points))
    d, t = transform(detected, m), transform(truth, m)
    dx, dy = t[1] - t[0]
    return float(np.median(np.linalg.norm(d - t, axis=1))), abs(float(np.degrees(np.arctan2(dy, dx))))


def run(args) -> dict:
    import cv2

    from feallm_llava.data.synthetic_scene import TONES, make_scene
    from feallm_llava.serve.detectors import make_detector

    cv2.setNumThreads(1)
    names = chosen(args)
    detectors = {n: make_detector(VARIANTS[n][0], model=args.detector_model, **VARIANTS[n][1]) for n in names}
    stats = {n: {"hits": [0] * len(TONES), "fp": 0, "ms": [], "lm": [], "roll": []} for n in names}
    faces_per_tone = [0] * len(TONES)
    for k in range(args.pictures):
        scene = make_scene(args.seed + k, tone_start=k % len(TONES))
        for f in scene.faces:
            faces_per_tone[f.tone] += 1
        for n, det in detectors.items():   # interleaved: every detector sees the same machine load
            times = []
            for _ in range(max(1, args.repeats)):
                t0 = time.perf_counter()
                boxes = det.detect(scene.image)
                times.append(time.perf_counter() - t0)
            s = stats[n]
            s["ms"].append(1000 * min(times))
            hits, fp = match(boxes, scene.faces, args.iou)
            s["fp"] += fp
            for j, b in hits.items():
                face = scene.faces[j]
                s["hits"][face.tone] += 1
                if b.landmarks is not None:
                    err, roll = landmark_error(b.landmarks, face.landmarks)
                    s["lm"].append(err)
                    s["roll"].append(roll)
    total = sum(faces_per_tone)
    report = {"pictures": args.pictures, "seed": args.seed, "faces": total, "faces_per_tone": faces_per_tone,
              "tones": list(TONES), "iou": args.iou, "threads": 1, "detectors": {}}
    for n in names:
        s = stats[n]
        recall = [h / max(1, c) for h, c in zip(s["hits"], faces_per_tone)]
        report["detectors"][n] = {
            "describe": detectors[n].describe(), "hits_per_tone": s["hits"], "recall_per_tone": recall,
            "recall": sum(s["hits"]) / max(1, total), "false_positives": s["fp"], "ms_per_picture": mean(s["ms"]),
            "landmark_error_px": median(s["lm"]) if s["lm"] else None,
            "residual_roll_deg": median(s["roll"]) if s["roll"] else None}
    return report


def synthetic_template(pictures: int = 300, size: int = 112) -> list[tuple[float, float]]:
    """The median of YuNet's 5 points over `pictures` training-like pictures of the demo
    (random identity, expression and per-frame nuisance), made mirror-symmetric about the
    vertical centre line and rounded to half pixels."""
    import numpy as np
    from PIL import Image

    from feallm_llava.data.synthetic import Identity, render_face, sample_expression
    from feallm_llava.serve.detectors import make_detector

    det = make_detector("yunet")
    points = []
    for k in range(pictures):
        rng = np.random.default_rng([k, 99])
        identity = Identity.sample(rng)
        _expression, aus = sample_expression(rng)
        canvas = Image.new("RGB", (2 * size, 2 * size), (120, 130, 140))   # room around: boxes stay whole
        canvas.paste(render_face(aus, identity, rng, size=size), (size // 2, size // 2))
        found = det.detect(canvas)
        if found:
            points.append(np.asarray(found[0].landmarks) - size // 2)
    m = np.median(np.asarray(points), axis=0)                              # (5, 2)
    half = lambda v: round(float(v) * 2) / 2
    out = [None] * 5
    for a, b in ((0, 1), (3, 4)):
        dx, y = (m[b, 0] - m[a, 0]) / 2, (m[a, 1] + m[b, 1]) / 2
        out[a], out[b] = (half(size / 2 - dx), half(y)), (half(size / 2 + dx), half(y))
    out[2] = (half(size / 2), half(m[2, 1]))
    return out


def verdict(report: dict, name: str) -> tuple[bool, str]:
    d = report["detectors"][name]
    worst, best = min(d["recall_per_tone"]), max(d["recall_per_tone"])
    haar = report["detectors"].get("haar")
    ratio = d["ms_per_picture"] / haar["ms_per_picture"] if haar else None
    ok = worst >= MIN_RECALL and best - worst <= MAX_SPREAD + 1e-9 and (ratio is None or ratio <= MAX_TIME_RATIO)
    time_text = f"{ratio:.2f}x Haar's time per picture" if ratio is not None else "Haar not timed"
    return ok, (f"default detector {name}: worst tone {100 * worst:.1f} % of faces found, best {100 * best:.1f} % "
                f"(spread {100 * (best - worst):.1f} points), {time_text} (target: every tone >= "
                f"{100 * MIN_RECALL:.0f} %, spread <= {100 * MAX_SPREAD:.0f} points, <= {MAX_TIME_RATIO}x Haar: "
                f"{'met' if ok else 'NOT met'}; {report['faces']} synthetic faces, {report['pictures']} pictures)")


def main(args: argparse.Namespace) -> int:
    # one thread for the OpenMP inside the yuface wheel: read when the library loads
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from feallm_llava.serve.detectors import DEFAULT_DETECTOR

    if args.measure_synthetic_template:
        print(f"synthetic template (112 px, YuNet's points on 300 training pictures): {synthetic_template()}")
        return 0
    report = run(args)
    tones = report["tones"]
    print(f"{report['faces']} faces in {report['pictures']} pictures (per tone {report['faces_per_tone']}), "
          f"hit = IoU >= {report['iou']}")
    print(f"{'detector':<11} " + " ".join(f"{t:>6}" for t in tones)
          + "    all    FP  ms/pic  lm err px  roll deg")
    for n, d in report["detectors"].items():
        lm = "" if d["landmark_error_px"] is None else f"{d['landmark_error_px']:.1f}"
        roll = "" if d["residual_roll_deg"] is None else f"{d['residual_roll_deg']:.1f}"
        print(f"{n:<11} " + " ".join(f"{100 * r:6.1f}" for r in d["recall_per_tone"])
              + f" {100 * d['recall']:6.1f} {d['false_positives']:5d} {d['ms_per_picture']:7.1f} {lm:>10} {roll:>9}")
    name = DEFAULT_DETECTOR if DEFAULT_DETECTOR in report["detectors"] else next(iter(report["detectors"]))
    ok, line = verdict(report, name)
    report["verdict"] = line
    print(line)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out / 'report.json'}")
    return 0
