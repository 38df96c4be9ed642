"""The FEALLM projector's forward replayed from CUDA graphs (opt-in, inference on a GPU).

At batch 1 on a GPU the projector is bound by kernel launches, not arithmetic: its few
hundred small kernels (16 crops, 4 conv blocks, 3 attentions, the sampling) each cost
more to launch from Python than to run (H100, bf16: 6.2 ms, 58 % of the CLIP tower's
10.7 ms, for ~2 ms of work). A CUDA graph records the kernels of one forward once and
replays them with a single launch.

`CapturedForward(fn)` keeps one graph per input signature (shapes, dtypes, device,
patch grid, and where the weights live: a graph reads the memory it was captured
with, so `.to()` or a load with assign=True needs a new one; at most `max_graphs`,
least recently used dropped first): the first call
with a new signature runs `fn` twice on a side stream (allocations, kernel choices,
the caches of model/deformable.py), captures a third run, then replays; every call
copies the inputs into the graph's static tensors, replays, and returns a copy of the
static output (the next replay overwrites it). It needs a forward without host
synchronisation or host-to-device copies, which the projector's is (its constants are
cached on the device at the first call).

`FeallmProjector` uses it on CUDA when no gradient is needed and `FEALLM_CUDA_GRAPHS=1`
(or `projector.cuda_graphs = True`); a capture that fails is logged and that signature
runs eagerly from then on. Not measured here (no GPU in this workplace): `python -m
feallm_llava.bench projector --device cuda --dtype bfloat16` times both paths.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from feallm_llava.model.features import TowerFeatures

log = logging.getLogger(__name__)

Signature = tuple


def signature(features: TowerFeatures) -> Signature:
    """What a captured graph is specific to: every tensor's shape, dtype and device, the grid."""
    tensors = [features.deep, *features.shallow, features.pixels]
    return tuple((None if t is None else (tuple(t.shape), t.dtype, t.device)) for t in tensors) + (
        tuple(features.grid),)


@dataclass
class _Entry:
    graph: object | None  # torch.cuda.CUDAGraph, or None: this signature runs eagerly
    inputs: TowerFeatures | None
    output: Tensor | None


class CudaGraph:
    """The capture backend: torch.cuda.CUDAGraph (tests put a CPU stand-in here)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], Tensor], warmup: int = 2) -> Tensor:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        with torch.cuda.graph(self.graph):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class CapturedForward:
    """`fn(features) -> Tensor` replayed from one CUDA graph per input signature."""

    def __init__(self, fn: Callable[[TowerFeatures], Tensor], max_graphs: int = 8,
                 backend: Callable[[torch.device], object] = CudaGraph,
                 state: Callable[[], tuple] = tuple) -> None:
        self.fn = fn
        self.state = state  # what else a graph depends on: where fn's weights live
        self.max_graphs = max_graphs
        self.backend = backend
        self.entries: OrderedDict[Signature, _Entry] = OrderedDict()

    def __call__(self, features: TowerFeatures) -> Tensor:
        key = signature(features) + self.state()
        entry = self.entries.get(key)
        if entry is None:
            entry = self._capture(features)
            self.entries[key] = entry
            while len(self.entries) > self.max_graphs:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        if entry.graph is None:
            return self.fn(features)
        with torch.inference_mode():  # the static tensors were made in inference mode
            for static, given in zip(_tensors(entry.inputs), _tensors(features)):
                static.copy_(given)
            entry.graph.replay()
        return entry.output.clone()  # a plain tensor: the next replay overwrites the static one

    def _capture(self, features: TowerFeatures) -> _Entry:
        device = features.deep.device
        try:
            with torch.inference_mode():
                static = TowerFeatures(
                    deep=features.deep.clone(), shallow=[s.clone() for s in features.shallow],
                    pixels=None if features.pixels is None else features.pixels.clone(), grid=tuple(features.grid))
                graph = self.backend(device)
                output = graph.capture(lambda: self.fn(static))
            return _Entry(graph, static, output)
        except Exception as err:  # noqa: BLE001 - any capture failure: run this signature eagerly
            log.warning("FEALLM projector: CUDA graph capture failed for %s (%s: %s); running it eagerly",
                        signature(features), type(err).__name__, err)
            return _Entry(None, None, None)


def _tensors(features: TowerFeatures) -> list[Tensor]:
    return [features.deep, *features.shallow, *([] if features.pixels is None else [features.pixels])]
