"""model/graphs.py: one captured forward per input signature, replayed with new inputs.

No GPU here: a CPU stand-in for torch.cuda.CUDAGraph records the function at capture
and reruns it into the same output tensor at replay, which is what a graph does to
its static memory. The plumbing around it (static inputs, copies, signatures, eviction,
fallback) is what is tested; bench projector --device cuda times the real graphs.
"""

from __future__ import annotations

import logging

import torch

from feallm_llava.model.graphs import CapturedForward
from tests.test_projector_pinned import build


class StandInGraph:
    captures = 0

    def __init__(self, device):
        self.fn = self.out = None

    def capture(self, fn, warmup=2):
        for _ in range(warmup):
            fn()
        StandInGraph.captures += 1
        self.fn, self.out = fn, fn()
        return self.out

    def replay(self):
        self.out.copy_(self.fn())


def other(features, seed):
    g = torch.Generator().manual_seed(seed)
    return type(features)(deep=torch.randn(features.deep.shape, generator=g),
                          shallow=[torch.randn(s.shape, generator=g) for s in features.shallow],
                          pixels=torch.randn(features.pixels.shape, generator=g), grid=features.grid)


def test_replays_compute_each_call_on_its_own_inputs():
    projector, features = build("tiny")
    captured = CapturedForward(projector._forward, backend=StandInGraph)
    with torch.no_grad():
        first = captured(features)
        second_inputs = other(features, 1)
        second = captured(second_inputs)
        torch.testing.assert_close(first, projector(features))
        torch.testing.assert_close(second, projector(second_inputs))
    assert len(captured.entries) == 1 and not first.is_inference()
    assert first.data_ptr() != captured.entries[next(iter(captured.entries))].output.data_ptr()


def test_one_graph_per_signature_least_recently_used_dropped():
    projector, features = build("tiny")
    captured = CapturedForward(projector._forward, max_graphs=2, backend=StandInGraph)
    before = StandInGraph.captures
    with torch.no_grad():
        for batch in (2, 1, 2, 3):  # 2 is reused; 3 evicts 1, the least recently used
            f = other(features, batch)
            f = type(f)(deep=f.deep[:1].expand(batch, -1, -1).clone(),
                        shallow=[s[:1].expand(batch, -1, -1).clone() for s in f.shallow],
                        pixels=f.pixels[:1].expand(batch, -1, -1, -1).clone(), grid=f.grid)
            torch.testing.assert_close(captured(f), projector(f))
    assert StandInGraph.captures - before == 3
    assert [key[0][0][0] for key in captured.entries] == [2, 3]


def test_a_capture_that_fails_runs_eagerly(caplog):
    projector, features = build("tiny")

    class Broken(StandInGraph):
        def capture(self, fn, warmup=2):
            raise RuntimeError("operation not permitted when stream is capturing")

    captured = CapturedForward(projector._forward, backend=Broken)
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        torch.testing.assert_close(captured(features), projector(features))
        torch.testing.assert_close(captured(features), projector(features))
    assert "running it eagerly" in caplog.text and caplog.text.count("capture failed") == 1


def test_projector_on_cpu_never_captures(monkeypatch):
    projector, features = build("tiny")
    projector.cuda_graphs = True
    with torch.no_grad():
        projector(features)
    assert getattr(projector, "_captured", None) is None
