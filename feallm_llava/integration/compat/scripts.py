"""Shims for upstream's own scripts: the eval scripts (`python -m llava.eval.model_vqa ...`)
and the command-line chat (`python -m llava.serve.cli`), each run as `__main__`.

The eval scripts are written for a CUDA machine: they load with the builder's default
`device="cuda"` and move every tensor with `.cuda()` / `.to(device="cuda")` / `.half()`.
On a GPU nothing here acts; on a machine without CUDA they run on the CPU, in float32,
so that CI (and a laptop) can run them as written. Given no `--conv-mode`, the scripts
prompt with the template the checkpoint records it was trained with.
"""

from __future__ import annotations

import sys

from feallm_llava.integration.compat.shim import shim
from feallm_llava.integration.marks import wrap

EVAL_SCRIPTS = ("llava.eval.",)  # upstream's evaluation scripts
CHAT_SCRIPTS = ("llava.serve.cli", "llava.eval.")  # scripts that take --conv-mode


def running(prefixes: tuple[str, ...]) -> bool:
    """This process is `python -m <one of upstream's scripts named by prefixes>`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", "").startswith(prefixes)


def _cuda_missing() -> bool:
    import torch

    return not torch.cuda.is_available()


def _keep_on_cpu() -> None:
    """`.cuda()`, `.to("cuda")` and `.half()` of the scripts keep tensors on the CPU, in float32."""
    import torch

    def to(original):
        def to_(self, *args, **kwargs):
            return original(self, *(_cpu(a) for a in args), **{k: _cpu(v) for k, v in kwargs.items()})
        return to_

    def identity(_original):
        return lambda self, *args, **kwargs: self

    wrap(torch.Tensor, "to", "eval_scripts_on_cpu", to)
    wrap(torch.Tensor, "cuda", "eval_scripts_on_cpu", identity)
    wrap(torch.Tensor, "half", "eval_scripts_on_cpu", identity)  # float32 stays float32


def _cpu(value):
    """A CUDA device -> the CPU, float16 -> float32; anything else as it is."""
    import torch

    if isinstance(value, torch.device) and value.type == "cuda" or isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    return torch.float32 if value is torch.float16 else value


@shim("llava.model.builder", replaces="load_pretrained_model", versions="machines without CUDA")
def eval_scripts_on_cpu(original):
    """Without it: python -m llava.eval.model_vqa (and model_vqa_loader, _science,
    _mmbench) on a machine without CUDA: the model is loaded for "cuda" and every input
    is moved with .cuda(): AssertionError "Torch not compiled with CUDA enabled".

    Acts only in a process running one of upstream's eval scripts on a machine without
    CUDA: the builder loads onto the CPU, the model runs in float32 (float16 on a CPU is
    slow and buys nothing), and the scripts' `.cuda()`, `.to(device="cuda")` and `.half()`
    keep tensors on the CPU in float32. Anywhere else, and on any GPU, the scripts run
    exactly as upstream wrote them.
    """
    def load_pretrained_model(model_path, model_base, model_name, *args, **kwargs):
        if not (running(EVAL_SCRIPTS) and _cuda_missing()):
            return original(model_path, model_base, model_name, *args, **kwargs)
        kwargs.update(device="cpu", device_map="cpu")
        tokenizer, model, processor, context = original(model_path, model_base, model_name, *args, **kwargs)
        _keep_on_cpu()
        return tokenizer, model.float(), processor, context
    return load_pretrained_model


def _in_a_chat_script() -> bool:
    return running(CHAT_SCRIPTS)


@shim("llava.model.builder", versions="all, in llava.serve.cli and the llava.eval scripts", needed=_in_a_chat_script)
def scripts_conv_template(_module):
    """Without it: python -m llava.serve.cli (and the llava.eval scripts) given no
    --conv-mode prompt a checkpoint with the template its folder name suggests (llava_v0
    for a name without "v1"), not the one it was trained with: wrong answers, no error.

    In those scripts only, `ArgumentParser.parse_args` fills `conv_mode` with the template
    the checkpoint at `--model-path` records (`conv_template.recorded_template`) when the
    command line names none; an explicit `--conv-mode` wins. Applied when the script
    imports llava's builder, before its `__main__` block parses the command line.
    """
    import argparse

    wrap(argparse.ArgumentParser, "parse_args", "scripts_conv_template", _recorded_default)


def _recorded_default(original):
    def parse_args(self, args=None, namespace=None):
        parsed = original(self, args, namespace)
        given = sys.argv[1:] if args is None else list(args)
        if not hasattr(parsed, "conv_mode") or any(a.split("=")[0] == "--conv-mode" for a in given):
            return parsed
        import os

        from feallm_llava.integration.conv_template import recorded_template

        recorded = recorded_template(os.path.expanduser(getattr(parsed, "model_path", "") or ""))
        if recorded:
            print(f"[feallm] prompting with {recorded!r}, the conversation template this checkpoint "
                  f"records it was trained with (--conv-mode chooses another)", file=sys.stderr)
            parsed.conv_mode = recorded
        return parsed
    return parse_args
