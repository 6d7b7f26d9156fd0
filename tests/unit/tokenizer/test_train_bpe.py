"""Small BPE vocabularies: exact size, lossless on any Unicode, Tiktoken == HF tokenizers' own encoder,
better than bytes on held-out text, no merge across a pre-token, deterministic."""

import base64
import hashlib
import random

import pydoc_data.topics
import pytest

from herd.tokenizer import Tokenizer
from herd.tokenizer.tokenizer import PAT_STR, load_rank_file
from herd.tokenizer.train_bpe import train_bpe, train_tokenizer

TEXTS = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
TRAIN, HELD_OUT = TEXTS[:60], TEXTS[60:]
VOCAB = 1024


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tokenizer(TRAIN, tmp_path_factory.mktemp("bpe") / "tokenizer.model", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def tok(trained):
    return Tokenizer.from_file(trained.path)


def test_vocab_size_is_exact_and_loads_with_special_tokens_after_it(trained, tok):
    ranks = load_rank_file(trained.path)
    assert len(ranks) == trained.vocab_size == VOCAB
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert tok.n_words == VOCAB + 256 and tok.bos_id == VOCAB
    assert trained.sha256 == hashlib.sha256(trained.path.read_bytes()).hexdigest()
    # tiktoken's rank-file format: "<base64 bytes> <rank>" per line, in rank order.
    first = trained.path.read_bytes().splitlines()[65]
    assert first == base64.b64encode(b"A") + b" 65"


def _random_unicode(rng: random.Random, n: int) -> str:
    chars = []
    while len(chars) < n:
        cp = rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0x80, 0x800), rng.randrange(0x4E00, 0x9FFF),
                         rng.randrange(0x1F300, 0x1FAFF), rng.randrange(0, 0x110000)])
        if not 0xD800 <= cp <= 0xDFFF:  # lone surrogates are not text and cannot be UTF-8 encoded
            chars.append(chr(cp))
    return "".join(chars)


def test_round_trips_arbitrary_unicode(tok):
    rng = random.Random(0)
    samples = [_random_unicode(rng, rng.randrange(1, 200)) for _ in range(200)]
    samples += ["🦙 llamas 漢字かな交じり文 ﷽ e\u0301 \u200d👩‍👩‍👧", "\x00\t\r\n \U0010FFFF", "  spaces   \n\n\n"]
    for s in samples:
        assert tok.decode(tok.encode(s, bos=False, eos=False)) == s


def test_compresses_held_out_text_better_than_bytes(tok):
    n_bytes = sum(len(t.encode()) for t in HELD_OUT)
    n_tokens = sum(len(tok.encode(t, bos=False, eos=False)) for t in HELD_OUT)
    assert n_bytes / n_tokens > 2.5  # a byte-level vocabulary without merges would be 1.0


def test_same_tokens_as_hf_tokenizers_encoding_with_its_own_merges(tok):
    # The reference: HF's BPE model trained the same way, encoding with its merge list. Our rank file
    # through tiktoken must cut held-out text into exactly the same pieces.
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.train_from_iterator(TRAIN, trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=0, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    byte_of = {c: b for b, c in _gpt2_bytes_to_unicode().items()}
    for text in HELD_OUT:
        ours = [tok.decode_single_token_bytes(i) for i in tok.encode(text, bos=False, eos=False)]
        theirs = [bytes(byte_of[c] for c in piece) for piece in hf.encode(text).tokens]
        assert ours == theirs


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in table)})
    return table


def test_no_token_crosses_a_pre_token_boundary(tok, trained):
    # tiktoken returns a whole pre-token as one id when it is in the vocabulary, so a token whose text
    # the regex would cut in two cannot come back as one id.
    crossing = []
    for token, rank in load_rank_file(trained.path).items():
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            continue  # part of a multi-byte character
        if tok.encode(text, bos=False, eos=False) != [rank]:
            crossing.append(text)
    assert not crossing


def test_training_is_deterministic(trained, tmp_path):
    again = train_tokenizer(TRAIN, tmp_path / "again.model", vocab_size=VOCAB)
    assert again.sha256 == trained.sha256


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="at least 257"):
        train_bpe(["abc"], vocab_size=256)
    with pytest.raises(ValueError, match="supports only"):
        train_bpe(["tiny text"], vocab_size=5000)
    with pytest.raises(ValueError, match="no training text"):
        train_tokenizer([], tmp_path / "t.model", vocab_size=300)
