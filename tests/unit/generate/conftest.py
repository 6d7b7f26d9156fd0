"""Tiny models for the generation tests (debug preset: 2 layers, vocab 256, max_seq_len 256)."""

import pytest
import torch

from herd.model import ModelArgs, build_model


@pytest.fixture(scope="module")
def model():
    """A random debug model whose next token depends on the context, not just the last token.

    At the default init the residual stream is dominated by the current token's embedding (std 1
    vs ~0.01 for the block outputs), which makes the model nearly a bigram model: greedy output
    then barely changes when positions or visible keys are wrong, and padding bugs go unseen.
    Shrinking the embeddings and strengthening attention and the residual writers moves the
    logits by several units when the prefix changes.
    """
    m = build_model(ModelArgs.from_name("debug"), seed=0)
    with torch.no_grad():
        m.tok_embeddings.weight.mul_(0.1)
        for layer in m.layers.values():
            for w in (layer.attention.wq, layer.attention.wk, layer.attention.wo, layer.feed_forward.w2):
                w.weight.mul_(4.0)
        m.output.weight.mul_(3.0)  # sharper distributions: greedy comparisons do not hinge on near-ties
    return m.eval()


@pytest.fixture(scope="module")
def successor_model():
    """A debug model rigged so greedy decoding always emits (previous token + 1) mod 256.

    The residual stream of a freshly initialised model is dominated by the current token's
    embedding (std 1 vs ~0.01 for the block outputs), so making output row j the embedding of
    token j - 1 puts the argmax at current + 1 with a margin of ~18 logits. Tests then know in
    advance at which step a chosen stop token becomes the argmax.
    """
    m = build_model(ModelArgs.from_name("debug"), seed=0)
    V = m.args.vocab_size
    with torch.no_grad():
        m.output.weight.copy_(m.tok_embeddings.weight[(torch.arange(V) - 1) % V])
    return m.eval()
