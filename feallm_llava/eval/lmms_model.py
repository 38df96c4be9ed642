"""lmms-eval's `feallm` model: a LLaVA checkpoint answered by our batched LLaVA runner.

    lmms-eval --model feallm --model_args pretrained=CKPT,model_base=BASE --batch_size 8 \\
        --include_path runs/lmms-tasks --tasks feallm_feabench_fer,feallm_feabench_au

Registered with lmms-eval through the `lmms_eval.models` entry point (setup.cfg), so it
exists wherever feallm-llava is installed beside lmms-eval. Unlike lmms-eval's `llava`,
it loads a checkpoint as trained (`model_base=` for a LoRA or projector-only one; `llava`
accepts no base and so wants a merged checkpoint), prompts with the conversation template
the checkpoint records (`conv_mode=` chooses another), runs float32 on a CPU and batches
with left padding: `feallm_llava.inference.llava_runner.LlavaBackend`, the runner of
`feallm eval`, so both give the same answers to the same questions.

model_args: pretrained, model_base, conv_mode, device (cpu / cuda; default cuda when
there is one), dtype (float32 / float16 / bfloat16), max_new_tokens (when a task names
none). Decoding is greedy; a task's `until` strings cut the answer. `loglikelihood`
(multiple-choice tasks such as `feallm_<bench>_fer_mc`) returns summed losses from one
shared prefix per question. One image per question; one process (no data parallelism).

The only module of feallm_llava that imports lmms_eval.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from lmms_eval.api.model import lmms
from tqdm import tqdm

MODEL_ID = "feallm"


def manifest():
    """The `lmms_eval.models` entry point's payload."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.FeallmLlava")


@dataclass
class _Question:
    """One lmms-eval request as a `Query` of our runner; the image is fetched when asked."""
    id: str
    question: str
    visuals: Callable[[], list]
    where: str

    def load_image(self):
        visuals = [v for v in self.visuals() or [] if v is not None]
        if len(visuals) != 1 or not hasattr(visuals[0], "convert"):
            raise ValueError(f"feallm: {self.where} gives {len(visuals)} visual(s); the feallm model answers "
                             "questions about exactly one image")
        return visuals[0].convert("RGB")


def _stop_strings(gen_kwargs: dict) -> tuple[str, ...]:
    until = gen_kwargs.get("until") or ()
    return tuple(s for s in ([until] if isinstance(until, str) else until) if s)


def _passed_through(result: tuple[float, bool]):
    """A loglikelihood result as lmms-eval's evaluator must receive it. Its
    `unwrap_generation_output` (0.7.3) turns any output that is not text into `str(output)`,
    so a bare (loss, is_greedy) reached multiple_choice scoring as the string
    "(6.35, False)" and failed to unpack; a GenerationResult passes its payload on as is."""
    try:
        from lmms_eval.api.instance import GenerationResult
    except ImportError:  # an lmms-eval without the wrapper passes tuples through
        return result
    return GenerationResult(text=result)  # type: ignore[arg-type]


def cut_at(text: str, stops: tuple[str, ...]) -> str:
    """The answer up to the first of the task's `until` strings."""
    ends = [text.index(s) for s in stops if s in text]
    return text[:min(ends)].strip() if ends else text


class FeallmLlava(lmms):
    is_simple = True

    def __init__(self, pretrained: str, model_base: str | None = None, conv_mode: str | None = None,
                 device: str | None = None, dtype: str | None = None, batch_size: int | str = 8,
                 max_new_tokens: int | str = 256, max_batch_size: int | None = None, **unknown) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"feallm: unknown model_args {', '.join(sorted(unknown))}; it takes pretrained, "
                             "model_base, conv_mode, device, dtype, max_new_tokens")
        if str(batch_size).startswith("auto"):
            raise ValueError("feallm: --batch_size auto is not supported; give a number (8 suits a GPU)")
        from feallm_llava.inference.llava_runner import LlavaBackend

        self.backend = LlavaBackend(str(pretrained), model_base or None, conv_mode=conv_mode, device=device,
                                    dtype=dtype, max_new_tokens=int(max_new_tokens))
        self.batch_size = int(batch_size)
        self.default_max_new_tokens = int(max_new_tokens)
        self._warned_sampling = False

    def generate_until(self, requests) -> list[str]:
        """Greedy answers, batched by our runner; requests sharing generation settings
        are batched together, answers come back in request order."""
        groups: dict[tuple[int, tuple[str, ...]], list[tuple[int, _Question]]] = {}
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            self._check_greedy(gen_kwargs)
            doc = self.task_dict[task][split][doc_id]
            question = _Question(str(index), context, lambda f=doc_to_visual, d=doc: f(d),
                                 f"task {task!r} doc {doc_id}")
            limit = int(gen_kwargs.get("max_new_tokens") or self.default_max_new_tokens)
            groups.setdefault((limit, _stop_strings(gen_kwargs)), []).append((index, question))
        answers: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="Model Responding", disable=self.rank != 0) as bar:
            for (limit, stops), members in groups.items():
                self.backend.max_new_tokens = limit
                for question, text in self.backend.answer([q for _, q in members], batch_size=self.batch_size):
                    index = int(question.id)
                    answers[index] = cut_at(text, stops)
                    self.cache_hook.add_partial("generate_until", requests[index].args[:2], answers[index])
                    bar.update(1)
        return answers

    def _check_greedy(self, gen_kwargs: dict) -> None:
        if (gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0) and not self._warned_sampling:
            print("feallm: the task asks for sampling; the feallm model decodes greedily", file=sys.stderr)
            self._warned_sampling = True

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(loss, is_greedy) per request: the loss is the continuation's SUMMED negative
        log-probability after the question (lmms-eval's models return a loss, and its
        multiple_choice takes the argmin; a mean per token, as its `llava` returns,
        misranks labels of different token lengths). The requests of one doc share one
        prefix: the image and question run once, then all its continuations."""
        docs: dict[tuple, tuple[_Question, list[tuple[int, str]]]] = {}
        for index, request in enumerate(requests):
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            key = (task, split, doc_id, context)
            if key not in docs:
                doc = self.task_dict[task][split][doc_id]
                docs[key] = (_Question(str(len(docs)), context, lambda f=doc_to_visual, d=doc: f(d),
                                       f"task {task!r} doc {doc_id}"), [])
            # the template puts the separator between question and answer ("ASSISTANT: Anger")
            docs[key][1].append((index, continuation.lstrip()))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        questions = [q for q, _ in docs.values()]
        members = {q.id: m for q, m in docs.values()}
        with tqdm(total=len(requests), desc="Model Scoring", disable=self.rank != 0) as bar:
            for start in range(0, len(questions), self.batch_size):
                batch = questions[start:start + self.batch_size]
                scores = self.backend.continuation_scores(batch, [[t for _, t in members[q.id]] for q in batch])
                for question, row in zip(batch, scores):
                    for (index, _), (logprob, greedy) in zip(members[question.id], row):
                        results[index] = (-logprob, greedy)
                        self.cache_hook.add_partial("loglikelihood", requests[index].args[:2], results[index])
                        bar.update(1)
        return [_passed_through(r) for r in results]

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("feallm: only generate_until tasks (multi-round is not implemented)")
