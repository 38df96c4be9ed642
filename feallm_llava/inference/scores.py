"""Probabilities from a backend's log-probabilities: one per expression, one per AU.

Any backend with `score(items, continuations, batch_size)` (summed log-probability of each
answer text right after an item's prompt: the LLaVA runner, the OpenAI-compatible client
on a server that returns prompt log-probabilities) gives both:

Expressions. FEALLM's trained FER answers begin with the label ("Happiness. The person
..."), so P(label) is the probability of the label's tokens right after the FER prompt.
The 7 summed log-probabilities are normalised over the 7 (a softmax): the distribution of
the answer's first word restricted to the label set. The argmax is never a parse failure.

AUs. The trained AU answer lists the active AUs in FACS order, one clause each, in the
instruction set's fixed wording (`data.annotate_template`, `wording="fixed"`: the form
the demo trains on). Its per-AU probability is the model's conditional probability of AU
k given its own reading of the other 11: with S the set parsed from the generated answer,
the two answers that differ only in k (S with k, S without k) are rendered in the
trained form and scored as whole answers (with the end of turn: without it, the answer
that stops before AU k would be a prefix of the one naming it and always score higher),
and

    P(AU k) = P(answer(S + k)) / (P(answer(S + k)) + P(answer(S - k)))

(one of the two is answer(S) itself: 13 answers scored per item from one shared prefix).
The text-parsed AU set stays what it was; a model trained on other answer texts needs its
own renderer (`AuAnswerForm`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

from feallm_llava.facs.labels import AUS, EXPRESSIONS, au_key
from feallm_llava.inference import Query


class ScoringBackend(Protocol):
    def score(self, items: Iterable[Query], continuations: Sequence[str] | Callable[[Query], Sequence[str]],
              batch_size: int = 8, complete: bool = False) -> Iterator[tuple[Query, list[float]]]: ...


def softmax(logprobs: Sequence[float]) -> list[float]:
    """Normalised probabilities of summed log-probabilities (max-shifted: no overflow)."""
    if not logprobs:
        raise ValueError("softmax of no log-probabilities")
    top = max(logprobs)
    if math.isinf(top):
        raise ValueError(f"every candidate has log-probability {top}: nothing to normalise")
    weights = [math.exp(v - top) for v in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


def expression_probabilities(logprobs: Sequence[float]) -> dict[str, float]:
    """{expression: P} from the 7 labels' summed log-probabilities (EXPRESSIONS order)."""
    if len(logprobs) != len(EXPRESSIONS):
        raise ValueError(f"{len(logprobs)} log-probabilities for {len(EXPRESSIONS)} expressions")
    return dict(zip(EXPRESSIONS, softmax(logprobs)))


class AuAnswerForm:
    """The trained AU answer for a set of AUs: the template annotator's fixed wording."""

    def __init__(self) -> None:
        from feallm_llava.data.annotate_template import TemplateAnnotator

        self._annotator = TemplateAnnotator(wording="fixed")

    def __call__(self, aus: Iterable[int]) -> str:
        labels = {au: int(au in set(aus)) for au in AUS}
        # the movement text does not depend on the expression; any valid one is passed
        return self._annotator.annotate("Neutral", labels, key="").movement


def au_candidates(read: Iterable[int], form: Callable[[Iterable[int]], str]) -> list[str]:
    """answer(S), then for each of the 12 AUs the answer with that AU toggled."""
    base = set(read) & set(AUS)
    return [form(sorted(base))] + [form(sorted(base ^ {au})) for au in AUS]


def au_probabilities(read: Iterable[int], logprobs: Sequence[float]) -> dict[str, float]:
    """{"AU01": P, ...} from the summed log-probabilities of `au_candidates(read)`."""
    if len(logprobs) != len(AUS) + 1:
        raise ValueError(f"{len(logprobs)} log-probabilities for {len(AUS) + 1} AU answers")
    base = set(read)
    out = {}
    for au, toggled in zip(AUS, logprobs[1:]):
        with_au, without = (logprobs[0], toggled) if au in base else (toggled, logprobs[0])
        out[au_key(au)] = 1.0 / (1.0 + math.exp(min(without - with_au, 700.0)))  # logistic, no overflow
    return out


class Scorer:
    """Expression and AU probabilities of answered items, through one backend."""

    def __init__(self, backend: ScoringBackend, batch_size: int = 8,
                 form: Callable[[Iterable[int]], str] | None = None):
        self.backend = backend
        self.batch_size = batch_size
        self.form = form or AuAnswerForm()

    def expressions(self, items: Sequence[Query]) -> dict[str, dict[str, float]]:
        """item id -> {expression: P}."""
        return {item.id: expression_probabilities(lp)
                for item, lp in self.backend.score(items, list(EXPRESSIONS), batch_size=self.batch_size)}

    def aus(self, items: Sequence[Query], read: dict[str, Iterable[int]]) -> dict[str, dict[str, float]]:
        """item id -> {"AU01": P, ...}; `read[item.id]` is the AU set parsed from its answer."""
        sets = {item.id: sorted(set(read[item.id]) & set(AUS)) for item in items}
        # whole answers, with their end of turn: answer(S - k) is often a prefix of answer(S + k)
        pairs = self.backend.score(items, lambda item: au_candidates(sets[item.id], self.form),
                                   batch_size=self.batch_size, complete=True)
        return {item.id: au_probabilities(sets[item.id], lp) for item, lp in pairs}
