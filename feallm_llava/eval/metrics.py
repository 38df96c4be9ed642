"""FER accuracy, per-AU F1 and the confusion matrix (paper section 3.3, Tab. 1, 2, 5).

FER: accuracy over all FER items. A prediction of None (the parser found no class, or
the answer was ambiguous) is a parse failure: it counts as wrong and is reported in
its own count and in the confusion matrix's last column; it is never mapped to a
default class (Emotion-LLaMA maps unknown answers to "neutral", which inflates Neutral).

AUD: per-AU binary F1 with the true/false positives/negatives summed over all items,
then F1 per AU, then the unweighted mean over the scored AUs — the convention of
ME-GraphAU / the FERA and ABAW challenges (sklearn `f1_score` per AU column). An AU
never present and never predicted has F1 0.0 (sklearn's zero_division=0), never NaN.
An AUD answer that names no AU at all is a parse failure: it predicts no AU (so every
AU present in that item is a miss) and is counted separately.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np

from feallm_llava.facs.labels import EXPRESSIONS, au_key

PARSE_FAILURE = "parse failure"  # name of the confusion matrix's extra column


@dataclass(frozen=True)
class FerMetrics:
    n: int                              # FER items scored
    correct: int
    accuracy: float                     # correct / n, in [0, 1]
    parse_failures: int                 # predictions of None (counted wrong)
    labels: tuple[str, ...]             # confusion rows (ground truth) = labels.EXPRESSIONS
    columns: tuple[str, ...]            # confusion columns: labels + PARSE_FAILURE
    confusion: tuple[tuple[int, ...], ...]  # (7, 8) counts, rows gt, cols pred

    def to_dict(self) -> dict:
        d = asdict(self)
        d["confusion"] = [list(r) for r in self.confusion]
        return d


@dataclass(frozen=True)
class AuMetrics:
    n: int                              # AUD items scored
    aus: tuple[int, ...]                # AUs scored, ascending
    f1: dict[int, float]                # per AU, in [0, 1]
    mean_f1: float                      # unweighted mean over `aus`
    tp: dict[int, int]
    fp: dict[int, int]
    fn: dict[int, int]
    support: dict[int, int]             # items where the AU is present
    parse_failures: int                 # answers that name no AU (predict none)

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "aus": list(self.aus),
            "f1": {au_key(a): self.f1[a] for a in self.aus},
            "mean_f1": self.mean_f1,
            "tp": {au_key(a): self.tp[a] for a in self.aus},
            "fp": {au_key(a): self.fp[a] for a in self.aus},
            "fn": {au_key(a): self.fn[a] for a in self.aus},
            "support": {au_key(a): self.support[a] for a in self.aus},
            "parse_failures": self.parse_failures,
        }


# ----------------------------------------------------------------------------- FER

def _check_fer(gt: Sequence[str], pred: Sequence[str | None]) -> None:
    if len(gt) != len(pred):
        raise ValueError(f"{len(gt)} ground-truth expressions but {len(pred)} predictions")
    if not gt:
        raise ValueError("no FER items to score")
    for i, (g, p) in enumerate(zip(gt, pred)):
        if g not in EXPRESSIONS:
            raise ValueError(f"item {i}: ground truth {g!r} is not one of {', '.join(EXPRESSIONS)}")
        if p is not None and p not in EXPRESSIONS:
            raise ValueError(f"item {i}: prediction {p!r} is not one of {', '.join(EXPRESSIONS)} "
                             "or None (parse failure)")


def fer_accuracy(gt: Sequence[str], pred: Sequence[str | None]) -> float:
    """Fraction of items whose prediction equals the ground truth; None is wrong."""
    _check_fer(gt, pred)
    return sum(g == p for g, p in zip(gt, pred)) / len(gt)


def confusion_matrix(gt: Sequence[str], pred: Sequence[str | None]) -> np.ndarray:
    """(7, 8) int counts: rows ground truth, columns prediction, last column = None."""
    _check_fer(gt, pred)
    index = {c: i for i, c in enumerate(EXPRESSIONS)}
    out = np.zeros((len(EXPRESSIONS), len(EXPRESSIONS) + 1), dtype=np.int64)
    for g, p in zip(gt, pred):
        out[index[g], len(EXPRESSIONS) if p is None else index[p]] += 1
    return out


def fer_metrics(gt: Sequence[str], pred: Sequence[str | None]) -> FerMetrics:
    cm = confusion_matrix(gt, pred)
    correct = int(np.trace(cm[:, :len(EXPRESSIONS)]))
    return FerMetrics(
        n=len(gt),
        correct=correct,
        accuracy=correct / len(gt),
        parse_failures=int(cm[:, -1].sum()),
        labels=EXPRESSIONS,
        columns=EXPRESSIONS + (PARSE_FAILURE,),
        confusion=tuple(tuple(int(v) for v in row) for row in cm),
    )


# ----------------------------------------------------------------------------- AUD

def au_matrix(sets: Iterable[Iterable[int] | None], aus: Sequence[int]) -> np.ndarray:
    """(N, K) bool: item i has AU aus[k]. None (a parse failure) is an empty row."""
    aus = list(aus)
    col = {a: k for k, a in enumerate(aus)}
    rows = list(sets)
    out = np.zeros((len(rows), len(aus)), dtype=bool)
    for i, s in enumerate(rows):
        for a in (s or ()):
            if a in col:
                out[i, col[a]] = True
    return out


def au_f1(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(N, K) bool x2 -> (K,) F1 per column with counts summed over items; 0 where undefined.

    F1 = 2 TP / (2 TP + FP + FN), which equals sklearn's f1_score(zero_division=0)
    per column, including TP + FP + FN = 0 (never present, never predicted) -> 0.
    """
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape or gt.ndim != 2:
        raise ValueError(f"ground truth {gt.shape} and predictions {pred.shape} must both be (N, K)")
    tp = (gt & pred).sum(axis=0)   # (K,)
    fp = (~gt & pred).sum(axis=0)
    fn = (gt & ~pred).sum(axis=0)
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def au_metrics(gt: Sequence[Iterable[int]], pred: Sequence[Iterable[int] | None],
               aus: Sequence[int]) -> AuMetrics:
    """Per-AU F1 over `aus`; a None prediction is a parse failure that predicts no AU."""
    if len(gt) != len(pred):
        raise ValueError(f"{len(gt)} ground-truth AU sets but {len(pred)} predictions")
    if not gt:
        raise ValueError("no AUD items to score")
    aus = tuple(sorted({int(a) for a in aus}))
    if not aus:
        raise ValueError("no AUs to score (au_targets is empty)")
    g = au_matrix(gt, aus)       # (N, K)
    p = au_matrix(pred, aus)     # (N, K)
    f1 = au_f1(g, p)             # (K,)
    tp = (g & p).sum(axis=0)
    fp = (~g & p).sum(axis=0)
    fn = (g & ~p).sum(axis=0)
    return AuMetrics(
        n=len(gt),
        aus=aus,
        f1={a: float(f1[k]) for k, a in enumerate(aus)},
        mean_f1=float(f1.mean()),
        tp={a: int(tp[k]) for k, a in enumerate(aus)},
        fp={a: int(fp[k]) for k, a in enumerate(aus)},
        fn={a: int(fn[k]) for k, a in enumerate(aus)},
        support={a: int(g[:, k].sum()) for k, a in enumerate(aus)},
        parse_failures=sum(s is None for s in pred),
    )
