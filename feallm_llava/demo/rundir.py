"""The demo's run directory: its settings (manifest), a marker per finished stage, timings.

A run resumes from its last finished stage (`--resume`); a folder holding another run
with other settings, or anything that is not a demo run, is refused.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from feallm_llava.demo.config import DemoConfig
from feallm_llava.errors import UsageError

MANIFEST = "feallm_demo.json"


class Run:
    """The run directory: manifest, stage markers, timings."""

    def __init__(self, out: Path, cfg: DemoConfig, resume: bool, until: str | None = None):
        self.out, self.cfg, self.until = out, cfg, until
        self.stopped = False  # True once the `until` stage has finished
        self.times: list[tuple[str, float, bool]] = []
        manifest = out / MANIFEST
        want = asdict(cfg)
        if manifest.exists():
            have = json.loads(manifest.read_text())
            if have != want:
                diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
                raise UsageError(f"{out} holds a run with other settings {diff} "
                                 "(was, now); choose another --out or delete that directory")
            if not resume and not self.done("analyze"):
                raise UsageError(f"{out} holds an unfinished run with these settings; "
                                 "pass --resume to continue it from its last finished stage")
        elif out.exists() and any(out.iterdir()):
            raise UsageError(f"{out} is not empty and holds no demo run; "
                             "choose another --out (nothing was written)")
        out.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps(want, indent=2))

    def marker(self, name: str) -> Path:
        return self.out / ".stages" / f"{name}.done"

    def done(self, name: str) -> bool:
        return self.marker(name).exists()

    def stage(self, name: str, title: str, fn) -> None:
        if self.stopped:
            return
        self.stopped = self.until is not None and name.split("-")[0] == self.until
        if self.done(name):
            print(f"== [{name}] {title}: done in an earlier run, skipped", flush=True)
            self.times.append((name, float(json.loads(self.marker(name).read_text())["seconds"]), True))
            return
        print(f"== [{name}] {title}", flush=True)
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        self.marker(name).parent.mkdir(exist_ok=True)
        self.marker(name).write_text(json.dumps({"seconds": seconds}))
        self.times.append((name, seconds, False))
        print(f"   [{name}] done in {seconds:.1f} s", flush=True)
