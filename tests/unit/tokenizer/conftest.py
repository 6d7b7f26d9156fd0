import pytest

from herd.tokenizer import Tokenizer, llama3_tokenizer_path


@pytest.fixture(scope="session")
def llama3() -> Tokenizer:
    # Loading parses 128,000 ranks (~0.4 s); share one instance across the tokenizer tests.
    return Tokenizer.from_file(llama3_tokenizer_path())
