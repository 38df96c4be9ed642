"""Subject-disjoint train / eval split and seeded sampling of the FEA set.

Paper section 3.1: 16,227 Aff-Wild2 images that carry both FE and AU labels are sampled;
14,892 build the training instructions and 1,335 the evaluation set (FEABench), and
"the training and evaluation data come from different subjects".

How it is done here:
1. Records are grouped by `person` (records.person_of: a two-person video's `_left`
   and `_right` halves are one person), so no person appears on both sides.
2. Persons are shuffled with the seed and given to the eval pool until it holds the eval
   share `eval_size / (train_size + eval_size)` of all eligible frames (at least one
   person each side); the rest form the train pool. Both pools are then sampled at about
   the same rate.
3. Each pool is sampled without replacement in a seeded order; optional per-class caps
   (a share of the split, 0 < cap <= 1, the same meaning for train and eval) stop a class
   from filling more than its share; `accept` lets the caller drop a frame during
   sampling (the builder drops unreadable images) and the next one takes its place.
A pool smaller than its requested size gives what it has; `SplitResult` says so.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from feallm_llava.facs.labels import EXPRESSIONS
from feallm_llava.data.records import FaceRecord

# Paper section 3.1.
PAPER_TRAIN_SIZE = 14_892
PAPER_EVAL_SIZE = 1_335


@dataclass
class SplitResult:
    train: list[FaceRecord]
    eval: list[FaceRecord]
    train_persons: list[str]
    eval_persons: list[str]
    requested: dict[str, int]                       # {"train": n, "eval": n}
    pool_sizes: dict[str, int]                      # eligible frames in each pool
    rejected: int = 0                               # frames `accept` turned down
    notes: list[str] = field(default_factory=list)  # shortfalls, caps that bit


def parse_class_caps(text: str | None) -> dict[str, float]:
    """`"0.3"` (every class) or `"Neutral=0.25,Happiness=0.3"` -> {class: share}."""
    if not text:
        return {}
    caps: dict[str, float] = {}
    for part in text.split(","):
        part = part.strip()
        name, sep, value = part.partition("=")
        targets = EXPRESSIONS if not sep else (name.strip(),)
        value = value if sep else name
        for target in targets:
            if target not in EXPRESSIONS:
                raise ValueError(f"class cap {part!r}: unknown expression {target!r}; expected "
                                 f"one of {', '.join(EXPRESSIONS)}")
            try:
                share = float(value)
            except ValueError:
                raise ValueError(f"class cap {part!r}: {value!r} is not a number") from None
            if not 0 < share <= 1:
                raise ValueError(f"class cap {part!r}: a cap is a share of the split, "
                                 f"0 < cap <= 1")
            caps[target] = share
    return caps


def split_persons(records: Sequence[FaceRecord], eval_share: float,
                  seed: int) -> tuple[list[str], list[str]]:
    """(train persons, eval persons), disjoint, eval holding about `eval_share` of frames."""
    counts = Counter(r.person for r in records)
    persons = sorted(counts)
    if len(persons) < 2:
        raise ValueError(f"a subject-disjoint split needs at least 2 persons, found "
                         f"{len(persons)} ({', '.join(persons) or 'none'})")
    random.Random(seed).shuffle(persons)
    target = eval_share * sum(counts.values())
    eval_persons: list[str] = []
    held = 0
    for person in persons[:-1]:  # the last person always stays on the train side
        if eval_persons and held >= target:
            break
        eval_persons.append(person)
        held += counts[person]
    chosen = set(eval_persons)
    return sorted(p for p in persons if p not in chosen), sorted(eval_persons)


def sample(pool: Sequence[FaceRecord], size: int, seed: int, *,
           caps: Mapping[str, float] | None = None,
           accept: Callable[[FaceRecord], bool] | None = None) -> tuple[list[FaceRecord], int]:
    """Up to `size` records of `pool` in a seeded order, honouring caps; (picked, rejected)."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    limits = {name: int(share * size) for name, share in (caps or {}).items()}
    taken: Counter = Counter()
    picked: list[FaceRecord] = []
    rejected = 0
    for i in order:
        if len(picked) >= size:
            break
        record = pool[i]
        if record.expression in limits and taken[record.expression] >= limits[record.expression]:
            continue
        if accept is not None and not accept(record):
            rejected += 1
            continue
        taken[record.expression] += 1
        picked.append(record)
    # Stable output order (video, frame) so the written files do not depend on the shuffle.
    picked.sort(key=lambda r: (r.video, r.frame))
    return picked, rejected


def split_and_sample(records: Sequence[FaceRecord], *, train_size: int = PAPER_TRAIN_SIZE,
                     eval_size: int = PAPER_EVAL_SIZE, seed: int = 0,
                     caps: Mapping[str, float] | None = None,
                     accept: Callable[[FaceRecord], bool] | None = None) -> SplitResult:
    """Subject-disjoint split then seeded sampling of each side (module docstring)."""
    if train_size < 0 or eval_size < 0 or train_size + eval_size == 0:
        raise ValueError(f"train_size={train_size}, eval_size={eval_size}: sizes must be >= 0 "
                         f"and not both 0")
    train_persons, eval_persons = split_persons(
        records, eval_size / (train_size + eval_size), seed)
    pools: dict[str, list[FaceRecord]] = defaultdict(list)
    side = {p: "eval" for p in eval_persons} | {p: "train" for p in train_persons}
    for record in records:
        pools[side[record.person]].append(record)
    result = SplitResult(train=[], eval=[], train_persons=train_persons,
                         eval_persons=eval_persons,
                         requested={"train": train_size, "eval": eval_size},
                         pool_sizes={k: len(pools[k]) for k in ("train", "eval")})
    for offset, (name, size) in enumerate((("train", train_size), ("eval", eval_size))):
        picked, rejected = sample(pools[name], size, seed + offset, caps=caps, accept=accept)
        setattr(result, name, picked)
        result.rejected += rejected
        if len(picked) < size:
            result.notes.append(
                f"{name}: requested {size}, got {len(picked)} (pool of {len(pools[name])} "
                f"eligible frames, {rejected} rejected"
                + (", class caps applied" if caps else "") + ")")
    return result
