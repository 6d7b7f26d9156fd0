import random

from herd.tokenizer import StreamDecoder


def _stream(tok, ids):
    decoder = StreamDecoder(tok)
    pieces = [decoder.feed(i) for i in ids]
    return pieces, decoder.flush()


def test_multibyte_characters_are_never_split(llama3):
    text = "Family 👩‍👩‍👧‍👦, llama 🦙, 日本語の文章と한국어 텍스트, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ✓"
    ids = llama3.encode(text, bos=False, eos=False)
    # The case is only meaningful if some token ends inside a character.
    partial = [i for i in ids if _is_partial(llama3.decode_single_token_bytes(i))]
    assert partial, "expected tokens that hold part of a UTF-8 character"
    pieces, tail = _stream(llama3, ids)
    assert "".join(pieces) == text and tail == ""
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # a token that completed nothing yields nothing yet


def _is_partial(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_flush_returns_replacement_for_an_unfinished_character(llama3):
    ids = llama3.encode("ok 🦙", bos=False, eos=False)
    pieces, tail = _stream(llama3, ids[:-1])
    assert "".join(pieces) == "ok "
    assert tail == "\ufffd"


def test_flush_resets_for_the_next_stream(llama3):
    decoder = StreamDecoder(llama3)
    first = llama3.encode("🦙", bos=False, eos=False)
    decoder.feed(first[0])
    decoder.flush()
    assert "".join(decoder.feed(i) for i in llama3.encode("ab", bos=False, eos=False)) == "ab"


def test_stream_equals_decode_on_random_token_sequences(llama3):
    # Random ids include lone continuation bytes and truncated sequences: the stream must put
    # U+FFFD exactly where decode does.
    rng = random.Random(7)
    fragments = [i for i in range(llama3.n_words) if _is_partial(llama3.decode_single_token_bytes(i))]
    assert len(fragments) > 256
    for _ in range(300):
        n = rng.randrange(1, 30)
        ids = [rng.choice(fragments) if rng.random() < 0.6 else rng.randrange(llama3.n_words) for _ in range(n)]
        pieces, tail = _stream(llama3, ids)
        assert "".join(pieces) + tail == llama3.decode(ids)


def test_special_tokens_stream_as_their_text(llama3):
    pieces, tail = _stream(llama3, [llama3.eot_id])
    assert pieces == ["<|eot_id|>"] and tail == ""
