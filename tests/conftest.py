"""Shared fixtures: the offline tiny-model kit, built once per test run."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def kit(tmp_path_factory):
    from feallm_llava.tinykit import build_kit

    return build_kit(tmp_path_factory.mktemp("kit"))


@pytest.fixture(scope="session")
def tokenizer(kit):
    from feallm_llava.tinykit import load_tokenizer

    return load_tokenizer(kit.tokenizer)
