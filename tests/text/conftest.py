"""Tiny random causal LMs and word-level tokenizers, built here (no downloads)."""

from __future__ import annotations

import pytest
from text_helpers import make_model, make_tokenizer


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A saved tiny Llama + chat tokenizer folder (``from_pretrained`` loads it)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = make_tokenizer()
    make_model(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path
