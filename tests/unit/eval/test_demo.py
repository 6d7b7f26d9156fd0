import pytest

from herd.eval.demo import run_long_context_demo
from herd.eval.needle import needle_training_texts
from herd.eval.results import EvalReport


def test_long_context_demo_reports_both_models(byte_tok, make_oracle, tmp_path):
    perplexity = pytest.importorskip("herd.eval.perplexity").perplexity  # the quantization area's module
    before, after = make_oracle(window=150), make_oracle(window=1000)  # "short" and "extended" context
    val = list(b"The llama hums. The alpaca sleeps. " * 8)
    lines = []
    res = run_long_context_demo(before, after, byte_tok, out_dir=tmp_path, val_tokens=val, short_len=64,
                                lengths=[140, 400], depths=[0.0, 1.0], trials=1, echo=lines.append)
    assert res.needle_before.accuracy == [[1.0, 0.0], [1.0, 1.0]]
    assert res.needle_after.accuracy == [[1.0, 1.0], [1.0, 1.0]]
    assert res.val_loss_before == pytest.approx(perplexity(before, val, seq_len=64).nll)
    assert res.heatmap.read_bytes()[:4] == b"\x89PNG"
    report = EvalReport.load(res.report)
    assert [t.task for t in report.tasks] == ["needle/before", "val_loss/before", "needle/after", "val_loss/after"]
    assert "needle acc @ 400" in lines[-1]


def test_training_texts_hold_the_question_and_answer(byte_tok):
    docs = needle_training_texts(byte_tok, num_docs=5, context_length=200, seed=1)
    assert len(set(docs)) == 5
    for d in docs:
        key = d.rsplit(" ", 1)[1].rstrip(".")
        assert f"The pass key is {key}." in d and d.endswith(f"The pass key is {key}.")
        assert 195 <= len(d.encode()) - len(f" {key}.") <= 200  # byte tokens: the prompt is 199 bytes after BOS
