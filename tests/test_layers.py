"""The package's floors: no module imports from a floor above its own, and only the llava
integration and the LLaVA inference backend import llava.

Every import statement counts, at module level or inside a function (a lazy import
still ties the two modules together). Modules are read as source, never imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "feallm_llava"

# Floors, bottom first: a module may import its own floor and those below.
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ground", ("feallm_llava.facs", "feallm_llava.jsonl", "feallm_llava.autoload", "feallm_llava.resources",
                "feallm_llava.errors")),
    ("model", ("feallm_llava.model",)),
    ("data", ("feallm_llava.data",)),
    ("integration", ("feallm_llava.integration",)),
    ("inference", ("feallm_llava.inference",)),
    ("eval", ("feallm_llava.eval",)),
    ("serve", ("feallm_llava.serve",)),
    ("tools", ("feallm_llava.tinykit", "feallm_llava.recipe", "feallm_llava.demo", "feallm_llava.bench",
               "feallm_llava.testing", "feallm_llava.cli", "feallm_llava.run", "feallm_llava.ui", "feallm_llava")),
)

# The llava integration knows llava's insides; the inference backend calls its public
# loader and templates. Nothing else imports llava.
MAY_IMPORT_LLAVA = ("feallm_llava.integration", "feallm_llava.inference.llava_runner")


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def floor_of(module: str) -> int:
    """Index of the floor that holds `module` (the longest matching prefix decides)."""
    best = None
    for index, (_name, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if _within(module, prefix) and (best is None or len(prefix) > len(best[1])):
                best = (index, prefix)
    if best is None:
        raise LookupError(f"{module} belongs to no floor: add it to FLOORS in tests/test_layers.py")
    return best[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported module) of every import in `source`, relative ones made absolute."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from pkg import name` may import the submodule pkg.name
            names = [f"{target}.{alias.name}" for alias in node.names if alias.name != "*"]
            found += [(node.lineno, name if _is_module(name) else target) for name in names] or [(node.lineno, target)]
    return found


def _is_module(dotted: str) -> bool:
    if not _within(dotted, "feallm_llava"):
        return False
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """What `module`'s source imports against the rules, one message per import."""
    own = floor_of(module)
    problems = []
    for line, target in imports_of(source, module, is_package):
        if _within(target, "llava") and not any(_within(module, p) for p in MAY_IMPORT_LLAVA):
            problems.append(f"{module}:{line} imports {target}: only {', '.join(MAY_IMPORT_LLAVA)} may import llava")
        if _within(target, "feallm_llava") and target != "feallm_llava" and floor_of(target) > own:
            problems.append(f"{module}:{line} ({FLOORS[own][0]}) imports {target} "
                            f"({FLOORS[floor_of(target)][0]}), a floor above")
    return problems


def package_modules() -> list[tuple[str, Path]]:
    return sorted((module_name(p), p) for p in PACKAGE.rglob("*.py"))


def test_every_module_of_the_package_is_on_a_floor():
    for module, _path in package_modules():
        floor_of(module)


@pytest.mark.parametrize("module,path", package_modules(), ids=[m for m, _ in package_modules()])
def test_module_imports_only_its_floor_and_those_below(module, path):
    assert violations(path.read_text(encoding="utf-8"), module, path.name == "__init__.py") == []


def test_model_package_imports_without_llava():
    import subprocess
    import sys

    code = ("import sys; sys.modules['llava'] = None\n"  # any import of llava now fails
            "import feallm_llava.model.projector, feallm_llava.model.features, feallm_llava.model.weights\n"
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"FEALLM_LLAVA_AUTOLOAD": "0", "PATH": "/usr/bin:/bin"}, cwd=PACKAGE.parent)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.parametrize("module,source,expected", [
    ("feallm_llava.data.records", "from feallm_llava.eval.parse import parse\n", "a floor above"),
    ("feallm_llava.data.records", "def f():\n    from feallm_llava.serve import analyze\n", "a floor above"),
    ("feallm_llava.model.tower", "from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower\n",
     "may import llava"),
    ("feallm_llava.eval.run", "def f():\n    import llava.mm_utils\n", "may import llava"),
    ("feallm_llava.eval.readers.rafdb", "from ... import serve\n", "a floor above"),
])
def test_checker_catches_what_the_rules_forbid(module, source, expected):
    problems = violations(source, module)
    assert len(problems) == 1 and expected in problems[0], problems


def test_checker_allows_imports_down_and_llava_where_it_belongs():
    assert violations("from feallm_llava.facs.parse import parse\nimport torch\n", "feallm_llava.eval.score") == []
    assert violations("from llava.model.builder import load_pretrained_model\n",
                      "feallm_llava.inference.llava_runner") == []
    assert violations("from llava.train import train\n", "feallm_llava.integration.registry.train_flags") == []
