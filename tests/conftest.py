"""Shared pytest fixtures: the tiny test world of :mod:`tests.factory` (built once per session).

See ``tests/factory.py`` for what each fixture holds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

from factory import TinyWorld, build_tiny_world  # noqa: E402
from web import CHROMIUM, launch  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium (skips where Playwright or /usr/bin/chromium is missing), one per module."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"Debian chromium is not installed at {CHROMIUM} (apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("tiny-world"))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tiny_world) -> Path:
    return tiny_world.tokenizer_dir


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_world) -> Path:
    return tiny_world.gpt2_dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_world) -> Path:
    return tiny_world.llama_dir


@pytest.fixture(scope="session")
def tiny_llama_chat_dir(tiny_world) -> Path:
    return tiny_world.llama_chat_dir


@pytest.fixture(scope="session")
def tiny_corpus_txt(tiny_world) -> Path:
    return tiny_world.corpus_txt


@pytest.fixture(scope="session")
def tiny_corpus_jsonl(tiny_world) -> Path:
    return tiny_world.corpus_jsonl


@pytest.fixture(scope="session")
def tiny_sae_ckpt(tiny_world) -> Path:
    return tiny_world.sae_ckpt


@pytest.fixture(scope="session")
def tiny_crosscoder_ckpt(tiny_world) -> Path:
    return tiny_world.crosscoder_ckpt


@pytest.fixture(scope="session")
def diff_setup(tiny_world):
    """A two-model crosscoder (Llama base vs perturbed copy), its models, and 22 sequences of 24 tokens."""
    from atlas.corpus import load_corpus
    from atlas.models import load_models
    from factory import crosscoder_from_ckkissane

    a, b = str(tiny_world.llama_dir), str(tiny_world.llama_chat_dir)
    cc = crosscoder_from_ckkissane(tiny_world.crosscoder_ckpt, [a, b])
    models = load_models(cc.sources, torch.device("cpu"), torch.float32)
    tokens = load_corpus(str(tiny_world.corpus_jsonl), models.tokenizer, n_sequences=22, seq_len=24, seed=1)
    return cc, models, tokens
