"""`feallm demo`: the offline end-to-end FEALLM run on synthetic FACS faces.

- `pipeline`: the stages, from drawing faces to scoring and analysing them.
- `config.DemoConfig`: data, model scale and training budget.
- `rundir.Run`: the run folder (settings, stage markers, resume).
- `warmup`: the tiny LLM's text-only warm-up (a stand-in for an LLM's pretraining).
"""

from feallm_llava.demo.pipeline import EXAMPLES, INTERRUPTED, add_arguments, main

__all__ = ["EXAMPLES", "INTERRUPTED", "add_arguments", "main"]
