"""Tiny models for the engine tests (debug preset: 2 layers, vocab 256, max_seq_len 256)."""

import pytest
import torch

from herd.model import ModelArgs, build_model


@pytest.fixture(scope="module")
def model():
    """A random debug model whose greedy output depends on the whole context, with sharp enough
    distributions that batched and single-row decoding (which round differently) pick the same
    tokens; see tests/unit/generate/conftest.py for why the rescaling is needed."""
    m = build_model(ModelArgs.from_name("debug"), seed=0)
    with torch.no_grad():
        m.tok_embeddings.weight.mul_(0.1)
        for layer in m.layers.values():
            for w in (layer.attention.wq, layer.attention.wk, layer.attention.wo, layer.feed_forward.w2):
                w.weight.mul_(4.0)
        m.output.weight.mul_(3.0)
    return m.eval()


@pytest.fixture(scope="module")
def successor_model():
    """Greedy decoding emits (previous token + 1) mod 256: stops are predictable."""
    m = build_model(ModelArgs.from_name("debug"), seed=0)
    V = m.args.vocab_size
    with torch.no_grad():
        m.output.weight.copy_(m.tok_embeddings.weight[(torch.arange(V) - 1) % V])
    return m.eval()
