"""Every module of the installed upstream `llava` package imports on this stack.

`llava-torch` is installed with `--no-deps` (its pins are 2023's), so what its modules
import at run time must come from our requirements; a module that cannot work here by
design is listed with the reason. Each module is imported in a fresh Python, so one
module's side effects (a monkey patch, a logging handler) cannot hide another's failure.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

# module -> why it cannot be imported on this stack
BY_DESIGN = {
    "llava.serve.sglang_worker": "SGLang is another serving engine, with its own environment",
    "llava.train.llama_flash_attn_monkey_patch": "needs flash-attn: the `gpu` extra on CUDA machines",
    "llava.eval.eval_gpt_review": "needs ray, and calls openai.ChatCompletion, which openai >= 1.0 removed",
}

PROBE = """
import importlib, io, contextlib, json, sys
failed = {}
for name in sys.argv[1:]:
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            importlib.import_module(name)
    except BaseException as err:
        failed[name] = f"{type(err).__name__}: {err}"
print(json.dumps(failed))
"""


def llava_modules() -> list[str]:
    root = Path(importlib.util.find_spec("llava").origin).parent
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = ["llava", *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def test_the_installed_llava_has_its_modules():
    names = llava_modules()
    assert len(names) >= 40 and "llava.eval.model_vqa_loader" in names and "llava.serve.model_worker" in names
    assert set(BY_DESIGN) <= set(names), "a module listed as unimportable by design is gone: update BY_DESIGN"


def test_every_llava_module_imports_or_is_listed_with_its_reason(tmp_path):
    names = llava_modules()
    # upstream's serving modules open their log files in the working directory when imported
    proc = subprocess.run([sys.executable, "-c", PROBE, *names], capture_output=True, text=True, timeout=600,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    unexpected = {name: why for name, why in failed.items() if name not in BY_DESIGN}
    assert not unexpected, "llava modules that do not import: " + "; ".join(f"{n}: {w}" for n, w in unexpected.items())
    now_import = sorted(set(BY_DESIGN) - set(failed))
    assert not now_import, f"{now_import} import now: remove them from BY_DESIGN"


@pytest.mark.parametrize("module", ["llava.eval.model_vqa_loader", "llava.eval.model_vqa", "llava.serve.cli"])
def test_upstream_entry_points_show_their_help(module, tmp_path):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert proc.returncode == 0 and "--model-path" in proc.stdout, proc.stderr[-2000:]
