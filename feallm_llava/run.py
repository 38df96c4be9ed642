"""`python -m feallm_llava.run MODULE|SCRIPT.py [ARGS...]`: run an upstream entry point
with FEALLM registered, for environments where `.pth` files are not processed
(e.g. `python -S`, some embedded or frozen interpreters, FEALLM_LLAVA_AUTOLOAD=0).

    python -m feallm_llava.run llava.serve.model_worker --model-path ... --device cpu
    python -m feallm_llava.run llava.train.train_mem --mm_projector_type feallm ...
"""

from __future__ import annotations

import runpy
import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__.strip())
        raise SystemExit(0 if argv else 2)
    import feallm_llava

    feallm_llava.register()
    target, sys.argv = argv[0], argv
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
