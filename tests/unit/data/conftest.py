import pydoc_data.topics
import pytest

from herd.tokenizer.train_bpe import train_tokenizer


@pytest.fixture(scope="session")
def topic_texts() -> list[str]:
    # The stdlib's pydoc topics: ~80 real English documents that every CPython ships.
    return [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory, topic_texts):
    """A 512-token BPE vocabulary (0.2 s to train), so shard tests need no tokenizer package."""
    return train_tokenizer(topic_texts, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=512).path
