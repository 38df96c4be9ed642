"""Metrics of probabilities: ROC AUC per AU, expected calibration error, tuned thresholds.

Beside the text-parsed figures of `metrics` (which stay what they are):

- FER: the likelihood accuracy (argmax of the 7 expression probabilities: never a parse
  failure) and the expected calibration error of the top-label confidence, with 10
  equal-width bins (Guo et al. 2017's ECE; bins are right-closed, (0.1, 0.2] ...):
  ECE = sum over bins of (items in bin / items) * |accuracy in bin - mean confidence|.
- AUD: ROC AUC per AU (the Mann-Whitney statistic: the chance that a random item with the
  AU scores above a random one without it, ties counting one half; sklearn's
  `roc_auc_score`), undefined (None) for an AU whose items are all of one class, and the
  mean over the defined ones. F1 at per-AU thresholds tuned on a validation split: the
  threshold that maximises that AU's F1 there (ties: the one closest to 0.5); a caller
  never passes the scored items (`feallm score --tune-on` refuses shared images).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

from feallm_llava.eval.metrics import au_f1
from feallm_llava.facs.labels import EXPRESSIONS, au_key

ECE_BINS = 10


@dataclass(frozen=True)
class FerProbMetrics:
    n: int
    accuracy: float                      # argmax of the probabilities == ground truth
    ece: float                           # expected calibration error of the top label
    bins: tuple[tuple[float, float, int, float, float], ...]  # (lower, upper, items, confidence, accuracy)
    nll: float                           # mean -log P(ground truth)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bins"] = [dict(zip(("lower", "upper", "items", "confidence", "accuracy"), b)) for b in self.bins]
        return d


@dataclass(frozen=True)
class AuProbMetrics:
    n: int
    aus: tuple[int, ...]
    auc: dict[int, float | None]         # None: the AU's items are all of one class
    mean_auc: float | None               # over the AUs with a defined AUC
    thresholds: dict[int, float] | None  # tuned on `tuned_on`; None without a validation split
    f1_tuned: dict[int, float] | None
    mean_f1_tuned: float | None
    tuned_on: tuple[str, ...] = ()       # the validation prediction files
    tuned_items: int = 0

    def to_dict(self) -> dict:
        keyed = lambda d: None if d is None else {au_key(a): d[a] for a in self.aus}  # noqa: E731
        return {"n": self.n, "aus": list(self.aus), "auc": keyed(self.auc), "mean_auc": self.mean_auc,
                "thresholds": keyed(self.thresholds), "f1_tuned": keyed(self.f1_tuned),
                "mean_f1_tuned": self.mean_f1_tuned, "tuned_on": list(self.tuned_on),
                "tuned_items": self.tuned_items}


# ----------------------------------------------------------------------------- AUC

def roc_auc(truth: Sequence[bool], scores: Sequence[float]) -> float | None:
    """ROC AUC of `scores` for binary `truth` (average ranks for ties); None if one class."""
    y = np.asarray(truth, dtype=bool)
    s = np.asarray(scores, dtype=float)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"truth {y.shape} and scores {s.shape} must be two vectors of one length")
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=float)
    sorted_s = s[order]
    start = 0
    while start < len(s):  # average rank over each run of equal scores
        end = start
        while end + 1 < len(s) and sorted_s[end + 1] == sorted_s[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


# ----------------------------------------------------------------------------- calibration

def calibration_bins(confidence: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS
                     ) -> list[tuple[float, float, int, float, float]]:
    """(lower, upper, items, mean confidence, accuracy) per equal-width bin, right-closed."""
    c = np.asarray(confidence, dtype=float)
    ok = np.asarray(correct, dtype=bool)
    if c.shape != ok.shape or c.ndim != 1 or not len(c):
        raise ValueError("calibration needs one confidence and one correctness per item")
    if ((c < 0) | (c > 1)).any():
        raise ValueError("confidences must lie in [0, 1]")
    index = np.clip(np.ceil(c * bins).astype(int) - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        member = index == b
        k = int(member.sum())
        out.append((b / bins, (b + 1) / bins, k, float(c[member].mean()) if k else 0.0,
                    float(ok[member].mean()) if k else 0.0))
    return out


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> float:
    table = calibration_bins(confidence, correct, bins)
    n = sum(k for _, _, k, _, _ in table)
    return float(sum(k / n * abs(acc - conf) for _, _, k, conf, acc in table))


def fer_prob_metrics(truth: Sequence[str], probs: Sequence[Mapping[str, float]]) -> FerProbMetrics:
    """Likelihood accuracy, ECE and NLL of expression probabilities (dicts over the 7)."""
    if len(truth) != len(probs) or not truth:
        raise ValueError(f"{len(truth)} ground-truth expressions for {len(probs)} probability rows")
    p = np.array([[row[e] for e in EXPRESSIONS] for row in probs], dtype=float)  # (N, 7)
    gt = np.array([EXPRESSIONS.index(t) for t in truth])
    top = p.argmax(axis=1)
    correct = top == gt
    conf = p[np.arange(len(p)), top]
    table = calibration_bins(conf, correct)
    return FerProbMetrics(
        n=len(truth), accuracy=float(correct.mean()), ece=expected_calibration_error(conf, correct),
        bins=tuple(table), nll=float(-np.log(np.maximum(p[np.arange(len(p)), gt], 1e-300)).mean()))


# ----------------------------------------------------------------------------- thresholds

def tune_threshold(truth: Sequence[bool], scores: Sequence[float]) -> float:
    """The threshold t (positive when score >= t) with the best F1 on these items; ties go to
    the t closest to 0.5. Candidates: midpoints between distinct scores, and beyond both ends."""
    y = np.asarray(truth, dtype=bool)
    s = np.asarray(scores, dtype=float)
    values = np.unique(s)
    candidates = np.concatenate([[values[0] / 2.0], (values[:-1] + values[1:]) / 2.0,
                                 [(values[-1] + 1.0) / 2.0 if values[-1] < 1.0 else np.nextafter(1.0, 2.0)]])
    pred = s[None, :] >= candidates[:, None]                             # (C, N)
    f1 = au_f1(np.broadcast_to(y, pred.shape).T, pred.T)                 # (C,)
    best = np.flatnonzero(f1 == f1.max())
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


def au_prob_metrics(truth: Sequence[Sequence[int]], probs: Sequence[Mapping[str, float]], aus: Sequence[int],
                    validation: tuple[Sequence[Sequence[int]], Sequence[Mapping[str, float]]] | None = None,
                    tuned_on: Sequence[str] = ()) -> AuProbMetrics:
    """AUC per AU on the scored items; with `validation` (truth, probs of other items) the
    per-AU thresholds tuned there and the F1 they give on the scored items."""
    from feallm_llava.eval.metrics import au_matrix

    if len(truth) != len(probs) or not truth:
        raise ValueError(f"{len(truth)} ground-truth AU sets for {len(probs)} probability rows")
    aus = tuple(sorted(set(aus)))
    g = au_matrix(truth, aus)                                             # (N, K)
    p = np.array([[row[au_key(a)] for a in aus] for row in probs], dtype=float)
    auc = {a: roc_auc(g[:, k], p[:, k]) for k, a in enumerate(aus)}
    defined = [v for v in auc.values() if v is not None]
    thresholds = f1_tuned = mean_tuned = None
    tuned_items = 0
    if validation is not None:
        vt, vp = validation
        if not vt:
            raise ValueError("the validation split has no AUD items with probabilities")
        vg = au_matrix(vt, aus)
        vs = np.array([[row[au_key(a)] for a in aus] for row in vp], dtype=float)
        thresholds = {a: tune_threshold(vg[:, k], vs[:, k]) for k, a in enumerate(aus)}
        t = np.array([thresholds[a] for a in aus])
        f1 = au_f1(g, p >= t[None, :])
        f1_tuned = {a: float(f1[k]) for k, a in enumerate(aus)}
        mean_tuned = float(f1.mean())
        tuned_items = len(vt)
    return AuProbMetrics(n=len(truth), aus=aus, auc=auc, mean_auc=float(np.mean(defined)) if defined else None,
                         thresholds=thresholds, f1_tuned=f1_tuned, mean_f1_tuned=mean_tuned,
                         tuned_on=tuple(tuned_on), tuned_items=tuned_items)
