"""Tiny models and a byte-level tokenizer for the post-training tests (everything runs in seconds)."""

import pytest
import torch

from herd.model import ModelArgs, build_model
from herd.tokenizer import ChatFormat, Tokenizer


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    # 256 single-byte ranks + the 256 Llama 3 special tokens: vocabulary 512, no merges.
    return Tokenizer({bytes([i]): i for i in range(256)}, name="bytes")


@pytest.fixture(scope="session")
def fmt(tok) -> ChatFormat:
    return ChatFormat(tok, version="3.1")


def tiny_args(**changes) -> ModelArgs:
    base = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16,
                     ffn_dim_multiplier=1.0, max_seq_len=512)
    return base.replace(**changes)


@pytest.fixture
def tiny_model():
    def make(seed: int = 0, **changes):
        return build_model(tiny_args(**changes), seed=seed)

    return make


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # These models are tiny: a second intra-op thread buys nothing, and on a busy 2-core machine
    # OpenMP's spinning barrier made each matmul ~40x slower with 2 threads than with 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
