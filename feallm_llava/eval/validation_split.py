"""A validation split for tuning what the scored items must not see (per-AU thresholds).

`feallm build-dataset` samples `train.json` from the training subjects and `eval.json`
(FEABench) from held-out ones. The frames of the training subjects that training never
used are a validation split: no held-out subject's face, no trained image. Written as a
FEABench `eval.json`, so `feallm eval --bench feabench --data <val.json>` runs it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from feallm_llava.facs.labels import AUS


def write_validation_split(affwild2_root: Path, fea_dir: Path, out: Path, size: int, seed: int = 0) -> int:
    """Up to `size` labelled frames of the training subjects absent from train.json and
    eval.json, seeded; returns how many were written to `out`."""
    from feallm_llava.data.affwild2 import read_affwild2

    root = Path(affwild2_root).resolve()
    image_root = root / "cropped_aligned"
    train = json.loads((Path(fea_dir) / "train.json").read_text(encoding="utf-8"))
    held = json.loads((Path(fea_dir) / "eval.json").read_text(encoding="utf-8"))
    used = {s["image"] for s in train} | {t["image"] for t in held}
    train_subjects = {s["image"].split("/", 1)[0] for s in train}
    held_subjects = {t["subject"] for t in held}
    pool = []
    for rec in read_affwild2(root):
        rel = Path(rec.image).resolve().relative_to(image_root).as_posix()
        if (rec.expression is None or rec.aus is None or any(au not in rec.aus for au in AUS)
                or rel in used or rec.subject in held_subjects or rel.split("/", 1)[0] not in train_subjects):
            continue
        pool.append({"id": f"val-{rec.video}_{rec.frame:05d}", "image": rel, "image_folder": str(image_root),
                     "expression": rec.expression, "aus": sorted(a for a in AUS if rec.aus[a] == 1),
                     "subject": rec.subject, "video": rec.video, "frame": rec.frame})
    random.Random(seed).shuffle(pool)
    chosen = sorted(pool[:size], key=lambda r: (r["video"], r["frame"]))
    Path(out).write_text(json.dumps(chosen, indent=1), encoding="utf-8")
    return len(chosen)
