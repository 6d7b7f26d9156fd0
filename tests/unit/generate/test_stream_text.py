"""Streaming text: never half a character, and the pieces add up to `decode` of the tokens."""

import pytest

from herd.generate import GREEDY, generate, stream_text


class FragmentTokenizer:
    """A fake tokenizer whose tokens are byte fragments, so characters straddle tokens."""

    PIECES = {
        11: b"h",
        12: b"\xf0\x9f", 13: b"\x98", 14: b"\x80",  # U+1F600 over three tokens
        15: b"\xc3", 16: b"\xa9",  # e-acute over two
        17: "\u20ac".encode(),  # euro sign whole
        18: b"\xff",  # never valid UTF-8
        112: b"\xe2", 113: b"\x82",  # the first two bytes of a euro sign, never completed
    }
    stop_tokens = (30, 114)

    def decode_single_token_bytes(self, token_id: int) -> bytes:
        return self.PIECES.get(token_id, bytes([ord("a") + token_id % 26]))

    def decode(self, ids) -> str:
        return b"".join(self.decode_single_token_bytes(t) for t in ids).decode("utf-8", errors="replace")


def _run(gen):
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as done:
            return events, done.value


def test_stream_holds_partial_characters_and_adds_up_to_decode(successor_model):
    tok = FragmentTokenizer()
    # successor model: row 0 emits 11, 12, ... until 30; row 1 emits 112, 113 then stops at 114
    events, results = _run(stream_text(successor_model, tok, [[10], [111]], max_new_tokens=40, sampling=GREEDY))
    row0 = [e.texts[0] for e in events]
    assert row0[:8] == ["h", "", "", "\U0001F600", "", "\u00e9", "\u20ac", "\ufffd"]
    assert results[0].tokens == list(range(11, 30)) and results[0].finish_reason == "stop"
    assert results[1].tokens == [112, 113] and results[1].stop_token == 114
    # row 1 ends mid-character: the held bytes are flushed as U+FFFD, exactly like decode
    assert [e.texts[1] for e in events[:3]] == ["", "", "\ufffd"]
    for i, r in enumerate(results):
        assert "".join(e.texts[i] for e in events) == tok.decode(r.tokens)


def test_stream_with_real_tokenizer_on_random_bytes(model):
    # Ids 0..255 of the Llama 3 vocabulary are the 256 single bytes, so a random debug model
    # emits arbitrary byte strings: multi-byte characters split, and invalid sequences.
    tokenizer_mod = pytest.importorskip("herd.tokenizer")
    try:
        tok = tokenizer_mod.Tokenizer.from_file(tokenizer_mod.llama3_tokenizer_path())
    except FileNotFoundError as e:
        pytest.skip(f"Llama 3 tokenizer file not available: {e}")
    prompts = [[1, 2, 3], [200, 201], [150]]
    events, results = _run(stream_text(model, tok, prompts, max_new_tokens=48, sampling=GREEDY, stop_tokens=()))
    assert results == generate(model, prompts, max_new_tokens=48, sampling=GREEDY)
    for i, r in enumerate(results):
        assert "".join(e.texts[i] for e in events) == tok.decode(r.tokens)
    text = "".join(t for e in events for t in e.texts)
    assert any(ch > "\x7f" and ch != "\ufffd" for ch in text), "no valid multi-byte character was streamed"


def test_stream_checks_inputs_at_the_call(successor_model):
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        stream_text(successor_model, FragmentTokenizer(), [[]], max_new_tokens=4)
