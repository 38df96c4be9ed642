"""FEALLM as a plugin for upstream LLaVA (`llava-torch`).

`import feallm_llava` registers the `feallm` vision tower and projector type with
llava's builders and arms the compatibility shims; both happen lazily, when llava
itself is imported, so this import stays cheap (no torch). With
`FEALLM_LLAVA_AUTOLOAD=0` nothing happens until `feallm_llava.register()` is called.

The package, bottom floor first (no module imports from a floor above its own):

    facs/, jsonl, errors, autoload, resources/   FACS vocabulary, the one text parser;
                    files, errors, start-up hook, package data
    model/          the FEALLM modules in pure PyTorch (no llava)
    data/           dataset readers, annotators, the instruction-set builder
    integration/    the llava integration: registry + compat, the only code that
                    knows llava's insides
    inference/      answering questions: a LLaVA checkpoint or an OpenAI-compatible server
    eval/           benchmarks, runner, scorer, reports
    serve/          analysis of photos and videos, the serving stack
    tinykit, recipe, demo/, bench/, testing/, cli, run, ui/   tools built on all of the above
"""

__version__ = "0.1.0"


def register() -> None:
    """Hook `feallm` into llava's builders and arm the compat shims. Idempotent."""
    from feallm_llava.integration import register as arm

    arm()


def _autoregister() -> None:
    from feallm_llava import autoload

    if autoload.enabled():
        register()


_autoregister()
