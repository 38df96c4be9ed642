"""Score reports: scores.json, scores.csv, the markdown table and the two plots.

The table is laid out like the paper's tables: one row per model and, per benchmark,
FE accuracy (Tab. 1, 2), the F1 of each scored AU and their average ("Avg.", Tab. 1, 5),
as percentages with 2 decimals. A benchmark shows only its own AUs (BP4D 10, DISFA 7).
Parse failures get their own table under each benchmark: they are already counted as
wrong in the scores above, and a reader must see how many there were.

JSON and CSV carry fractions in [0, 1] at full precision (for programs); the markdown
table carries percentages (for people). Plots use matplotlib's Agg canvas (no display).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from feallm_llava.facs.labels import AUS, au_key

from feallm_llava.eval.metrics import AuMetrics, FerMetrics
from feallm_llava.eval.probabilities import AuProbMetrics, FerProbMetrics


@dataclass(frozen=True)
class ReportRow:
    """The scores of one model on one benchmark."""
    model: str
    bench: str
    files: tuple[str, ...]                 # prediction files the items came from
    fer: FerMetrics | None = None          # None when the benchmark has no FER items
    aud: AuMetrics | None = None           # None when it has no AUD items
    fer_ambiguous: int = 0                 # FER parse failures where classes tied
    fer_prob: FerProbMetrics | None = None  # from `feallm eval --scores` probabilities
    aud_prob: AuProbMetrics | None = None

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "bench": self.bench,
            "files": list(self.files),
            "fer": self.fer.to_dict() if self.fer else None,
            "aud": self.aud.to_dict() if self.aud else None,
            "fer_ambiguous": self.fer_ambiguous,
            "fer_prob": self.fer_prob.to_dict() if self.fer_prob else None,
            "aud_prob": self.aud_prob.to_dict() if self.aud_prob else None,
        }


def _benches(rows: Sequence[ReportRow]) -> list[str]:
    return list(dict.fromkeys(r.bench for r in rows))


def _pct(x: float) -> str:
    return f"{100.0 * x:.2f}"


def _bench_aus(rows: Sequence[ReportRow]) -> list[int]:
    return sorted({a for r in rows if r.aud for a in r.aud.aus})


# ----------------------------------------------------------------------------- JSON / CSV

def write_json(rows: Sequence[ReportRow], path: Path, meta: dict) -> None:
    payload = {**meta, "rows": [r.to_dict() for r in rows]}
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def csv_columns(rows: Sequence[ReportRow]) -> list[str]:
    aus = sorted({a for r in rows if r.aud for a in r.aud.aus} | set(AUS))
    return (["model", "bench", "fer_n", "fer_accuracy", "fer_parse_failures",
             "aud_n", "aud_parse_failures"] + [au_key(a) for a in aus] + ["au_mean_f1"]
            + ["fer_likelihood_accuracy", "fer_ece"] + [f"{au_key(a)}_auc" for a in aus]
            + ["au_mean_auc", "au_mean_f1_tuned"])


def write_csv(rows: Sequence[ReportRow], path: Path) -> None:
    """One line per (model, bench); empty cells where a benchmark lacks a task or AU."""
    columns = csv_columns(rows)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            line: dict = {"model": r.model, "bench": r.bench}
            if r.fer:
                line.update(fer_n=r.fer.n, fer_accuracy=r.fer.accuracy,
                            fer_parse_failures=r.fer.parse_failures)
            if r.aud:
                line.update(aud_n=r.aud.n, aud_parse_failures=r.aud.parse_failures,
                            au_mean_f1=r.aud.mean_f1)
                line.update({au_key(a): r.aud.f1[a] for a in r.aud.aus})
            if r.fer_prob:
                line.update(fer_likelihood_accuracy=r.fer_prob.accuracy, fer_ece=r.fer_prob.ece)
            if r.aud_prob:
                line.update({f"{au_key(a)}_auc": r.aud_prob.auc[a] for a in r.aud_prob.aus
                             if r.aud_prob.auc[a] is not None})
                line.update(au_mean_auc=r.aud_prob.mean_auc, au_mean_f1_tuned=r.aud_prob.mean_f1_tuned)
            w.writerow(line)


# ----------------------------------------------------------------------------- markdown

def _md_table(header: list[str], body: list[list[str]], align: list[str]) -> list[str]:
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in body]
    return out


def render_table(rows: Sequence[ReportRow]) -> str:
    """Markdown: per benchmark, a score table (Tab. 1/2/5 layout) and a parse-failure table."""
    lines = ["# Scores", "",
             "Percentages. FE Acc: FER accuracy; AUk: F1 of AU k; Avg.: unweighted mean "
             "AU F1. Parse failures count as wrong predictions (FER) or as predicting no "
             "AU (AUD).", ""]
    for bench in _benches(rows):
        group = [r for r in rows if r.bench == bench]
        has_fer = any(r.fer for r in group)
        aus = _bench_aus(group)
        header = ["Methods"] + (["FE Acc"] if has_fer else []) \
            + [f"AU{a}" for a in aus] + (["Avg."] if aus else [])
        body = []
        for r in group:
            cells = [r.model]
            if has_fer:
                cells.append(_pct(r.fer.accuracy) if r.fer else "-")
            for a in aus:
                cells.append(_pct(r.aud.f1[a]) if r.aud and a in r.aud.f1 else "-")
            if aus:
                cells.append(_pct(r.aud.mean_f1) if r.aud else "-")
            body.append(cells)
        lines += [f"## {bench}", ""]
        lines += _md_table(header, body, ["l"] + ["r"] * (len(header) - 1))
        lines += [""]
        fail_header = ["Methods"]
        if has_fer:
            fail_header += ["FER items", "FER parse failures", "of which ambiguous"]
        if aus:
            fail_header += ["AUD items", "AUD parse failures"]
        fail_body = []
        for r in group:
            cells = [r.model]
            if has_fer:
                cells += ([str(r.fer.n), str(r.fer.parse_failures), str(r.fer_ambiguous)]
                          if r.fer else ["0", "-", "-"])
            if aus:
                cells += [str(r.aud.n), str(r.aud.parse_failures)] if r.aud else ["0", "-"]
            fail_body.append(cells)
        lines += _md_table(fail_header, fail_body, ["l"] + ["r"] * (len(fail_header) - 1))
        lines += [""]
        lines += _probability_table(group)
    return "\n".join(lines)


def _opt(x: float | None) -> str:
    return "-" if x is None else _pct(x)


def _probability_table(group: Sequence[ReportRow]) -> list[str]:
    """Probabilities beside the text figures: likelihood FE accuracy, ECE, mean AU AUC,
    AU F1 at thresholds tuned on a validation split (rows with probabilities only)."""
    scored = [r for r in group if r.fer_prob or r.aud_prob]
    if not scored:
        return []
    header = ["Methods", "FE Acc (text)", "FE Acc (likelihood)", "ECE", "AU F1 (text)", "mean AU AUC",
              "AU F1 (tuned thresholds)", "thresholds tuned on"]
    body = []
    for r in scored:
        a = r.aud_prob
        body.append([r.model, _opt(r.fer.accuracy if r.fer else None), _opt(r.fer_prob.accuracy if r.fer_prob else None),
                     _opt(r.fer_prob.ece if r.fer_prob else None), _opt(r.aud.mean_f1 if r.aud else None),
                     _opt(a.mean_auc if a else None), _opt(a.mean_f1_tuned if a else None),
                     (", ".join(a.tuned_on) + f" ({a.tuned_items} items)") if a and a.tuned_on else "-"])
    return ["Probabilities (`feallm eval --scores`), percentages; ECE of the top expression's probability.", ""] \
        + _md_table(header, body, ["l"] + ["r"] * 6 + ["l"]) + [""]


def write_table(rows: Sequence[ReportRow], path: Path) -> None:
    path.write_text(render_table(rows), encoding="utf-8")


# ----------------------------------------------------------------------------- plots

def plot_confusion(rows: Sequence[ReportRow], path: Path) -> bool:
    """One confusion matrix per (model, bench) with FER items; False when there are none.

    Colour = share of the ground-truth row (so classes of different sizes compare);
    the numbers are counts. The last column holds the parse failures.
    """
    from matplotlib.figure import Figure

    panels = [r for r in rows if r.fer]
    if not panels:
        return False
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(6.2 * cols, 5.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False)
    image = None
    for ax, r in zip(axes.flat, panels):
        cm = np.asarray(r.fer.confusion, dtype=float)               # (7, 8)
        share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)   # (7, 8)
        image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(cm.shape[1]), [c if c != "parse failure" else "parse\nfailure"
                                           for c in r.fer.columns], rotation=45, ha="right",
                      fontsize=8)
        ax.set_yticks(range(cm.shape[0]), r.fer.labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("ground truth")
        ax.set_title(f"{r.model} on {r.bench}: acc {_pct(r.fer.accuracy)}%", fontsize=10)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes, shrink=0.6, label="share of ground-truth row")
    fig.savefig(path, dpi=120)
    return True


def plot_au_f1(rows: Sequence[ReportRow], path: Path) -> bool:
    """Per-AU F1 bars, one panel per benchmark, one bar series per model; False if no AUD."""
    from matplotlib.figure import Figure

    benches = [b for b in _benches(rows) if any(r.aud for r in rows if r.bench == b)]
    if not benches:
        return False
    fig = Figure(figsize=(max(8.0, 1.0 + 0.9 * len(AUS)), 3.8 * len(benches)),
                 layout="constrained")
    axes = fig.subplots(len(benches), 1, squeeze=False)[:, 0]
    for ax, bench in zip(axes, benches):
        group = [r for r in rows if r.bench == bench and r.aud]
        aus = _bench_aus(group)
        ticks = [f"AU{a}" for a in aus] + ["Avg."]
        x = np.arange(len(ticks))
        width = 0.8 / len(group)
        for k, r in enumerate(group):
            values = [100.0 * r.aud.f1[a] if a in r.aud.f1 else 0.0 for a in aus] \
                + [100.0 * r.aud.mean_f1]
            ax.bar(x - 0.4 + width * (k + 0.5), values, width, label=r.model)
        ax.set_xticks(x, ticks)
        ax.set_ylim(0, 105)
        ax.set_ylabel("F1 (%)")
        ax.set_title(f"{bench}: per-AU F1")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=120)
    return True


def plot_reliability(rows: Sequence[ReportRow], path: Path) -> bool:
    """Reliability diagram of the expression probabilities, one panel per (model, bench):
    accuracy against mean confidence per bin, bar width the bin; False without probabilities."""
    from matplotlib.figure import Figure

    panels = [r for r in rows if r.fer_prob]
    if not panels:
        return False
    fig = Figure(figsize=(4.2 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, r in zip(axes, panels):
        bins = [b for b in r.fer_prob.bins if b[2]]
        ax.bar([(lo + hi) / 2 for lo, hi, *_ in bins], [acc for *_, acc in bins],
               width=[hi - lo for lo, hi, *_ in bins], edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([c for *_, c, _ in bins], [acc for *_, acc in bins], "o", color="black", ms=3,
                label="(confidence, accuracy)")
        ax.plot([0, 1], [0, 1], "--", color="grey", label="calibrated")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top expression's probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{r.model} on {r.bench}: ECE {_pct(r.fer_prob.ece)}%", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.savefig(path, dpi=120)
    return True
