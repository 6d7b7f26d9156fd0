import pytest

from herd.eval.needle import (
    NeedleTemplate,
    evaluate_needle,
    filler_tokens,
    make_needle_sample,
    needle_samples,
    plot_needle_heatmap,
)
from herd.tokenizer import Tokenizer, llama3_tokenizer_path


@pytest.fixture(scope="module")
def llama3():
    return Tokenizer.from_file(llama3_tokenizer_path())


@pytest.mark.parametrize("filler", ["passkey", "wikipedia"])
def test_needle_goes_exactly_where_asked_in_real_tokens(llama3, filler):
    t = NeedleTemplate()
    samples = needle_samples(llama3, lengths=[100, 1000, 3000], depths=[0.0, 0.1, 0.37, 0.5, 1.0], trials=2,
                             filler=filler, seed=5)
    assert len(samples) == 3 * 5 * 2
    for s in samples:
        needle = llama3.encode(t.needle.format(key=s.key), bos=False, eos=False)
        question = llama3.encode(t.question, bos=False, eos=False)
        assert len(s.tokens) == s.context_length  # length exact, in tokens
        assert s.tokens[0] == llama3.bos_id
        assert s.tokens[s.needle_start : s.needle_start + s.needle_len] == needle
        assert s.tokens[-len(question):] == question
        assert s.haystack_len == s.context_length - 1 - len(needle) - len(question)
        assert s.needle_start - 1 == round(s.depth * s.haystack_len)  # depth exact, in tokens
        assert s.answer_tokens == llama3.encode(f" {s.key}", bos=False, eos=False)
        assert len(s.key) == t.key_digits and s.key[0] != "0"
    # Depth 0: right after BOS; depth 1: right before the question.
    first = [s for s in samples if s.depth == 0.0][0]
    assert first.needle_start == 1
    last = [s for s in samples if s.depth == 1.0][0]
    assert last.needle_start + last.needle_len == last.context_length - len(llama3.encode(t.question, bos=False, eos=False))
    # Trials differ in key and in haystack text.
    pair = [s for s in samples if s.context_length == 1000 and s.depth == 0.5]
    assert pair[0].key != pair[1].key and pair[0].tokens[1:50] != pair[1].tokens[1:50]
    # Same seed, same samples.
    again = needle_samples(llama3, lengths=[100], depths=[0.5], trials=1, filler=filler, seed=5)
    assert again[0].tokens == [s for s in samples if s.context_length == 100 and s.depth == 0.5][0].tokens


def test_too_short_a_context_is_an_error(byte_tok):
    stream = filler_tokens(byte_tok, min_tokens=500)
    with pytest.raises(ValueError, match="too short"):
        make_needle_sample(byte_tok, stream, context_length=50, depth=0.5, key="12345")
    with pytest.raises(ValueError, match="depth"):
        make_needle_sample(byte_tok, stream, context_length=200, depth=1.5, key="12345")


def test_file_filler(byte_tok, tmp_path):
    f = tmp_path / "hay.txt"
    f.write_text("Llamas hum. ")
    s = needle_samples(byte_tok, lengths=[200], depths=[0.0], trials=1, filler=f)[0]
    hay = bytes(s.tokens[1 + s.needle_len : -40]).decode()
    assert set(hay.replace("Llamas hum. ", "x")) <= set("xLlamas hum. ")  # only the file's text, repeated
    with pytest.raises(FileNotFoundError, match="neither"):
        needle_samples(byte_tok, lengths=[200], depths=[0.0], trials=1, filler=tmp_path / "nope.txt")


@pytest.mark.parametrize("method", ["loglik", "generate"])
def test_accuracy_grid_follows_what_the_model_can_see(byte_tok, make_oracle, method):
    # The oracle retrieves perfectly within 200 tokens and not at all beyond: the grid must show
    # success for short contexts and for needles near the question, failure for deep ones in long
    # contexts, cell by cell in [depth][length] order.
    oracle = make_oracle(window=200)
    res = evaluate_needle(oracle, byte_tok, lengths=[150, 400], depths=[0.0, 0.5, 1.0], trials=2, method=method,
                          batch_size=3)
    assert res.accuracy == [[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]]
    assert res.mean_accuracy == pytest.approx(4 / 6)
    assert res.accuracy_at_length(150) == 1.0
    assert all((r.answer_logprob is None) == (method == "generate") for r in res.records)


def test_prompt_longer_than_the_model_is_an_error(byte_tok, make_oracle):
    with pytest.raises(ValueError, match="max_seq_len"):
        evaluate_needle(make_oracle(window=10, max_seq_len=256), byte_tok, lengths=[300], depths=[0.5], trials=1)


def test_heatmap_file_is_written(byte_tok, make_oracle, tmp_path):
    res = evaluate_needle(make_oracle(window=200), byte_tok, lengths=[150, 300], depths=[0.0, 1.0], trials=1)
    path = plot_needle_heatmap(res, tmp_path / "sub" / "needle.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert [p.name for p in path.parent.iterdir()] == ["needle.png"]  # no temporary left behind
    task = res.to_task_result()
    assert task.metrics["acc@150"] == 1.0 and task.config["accuracy_grid"] == res.accuracy
