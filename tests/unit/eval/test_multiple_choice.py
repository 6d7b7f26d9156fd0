import json
import math

import pytest
import torch

V = 512  # the byte tokenizer's vocabulary (conftest)
from herd.eval.multiple_choice import (
    MCExample,
    build_prompt,
    evaluate_mc,
    load_mc_jsonl,
    select_shots,
)


def test_few_shot_prompt_is_exact():
    shots = [MCExample("What is 1+1?", ("2", "3"), 0), MCExample("Colour of grass?", ("red", "green"), 1)]
    ex = MCExample("Capital of France?", ("Paris", "Rome"), 0)
    assert build_prompt(ex, shots) == (
        "Question: What is 1+1?\nAnswer: 2\n\n"
        "Question: Colour of grass?\nAnswer: green\n\n"
        "Question: Capital of France?\nAnswer:"
    )
    assert build_prompt(ex) == "Question: Capital of France?\nAnswer:"


def test_shots_are_deterministic_and_never_the_example_itself():
    pool = [MCExample(f"q{i}", ("a", "b"), 0) for i in range(6)]
    for i in range(6):
        shots = select_shots(pool, 5, seed=3, index=i, exclude_self=True)
        assert pool[i] not in shots and len(set(shots)) == 5
        assert shots == select_shots(pool, 5, seed=3, index=i, exclude_self=True)
    with pytest.raises(ValueError, match="only 5"):
        select_shots(pool, 6, seed=0, index=0, exclude_self=True)


def test_scores_match_a_hand_computed_bigram_ranking(byte_tok, make_bigram):
    # Uniform next-byte logits except that 'b' strongly follows 'b'.
    W = torch.zeros(V, V)
    b = ord("b")
    W[b, b] = 5.0
    model = make_bigram(W)
    ex = MCExample("x", ("a", "bbbb"), 1)
    result = evaluate_mc(model, byte_tok, [ex])
    uniform = -math.log(V)
    bb = 5.0 - math.log(V - 1 + math.exp(5.0))
    expected = [2 * uniform, 2 * uniform + 3 * bb]  # " a": ':'->' '->'a'; " bbbb": ':'->' '->'b', then b->b x3
    [pred] = result.predictions
    assert pred.logprobs == pytest.approx(expected, abs=1e-4)
    assert pred.byte_lengths == [1, 4]  # the choice's bytes, not the joining space
    # The sum prefers the short answer; per byte the long, likely one wins.
    assert (pred.pred, pred.pred_norm) == (0, 1)
    assert (result.accuracy, result.accuracy_norm) == (0.0, 1.0)
    assert result.answer_nll == pytest.approx(-expected[1] / 4, abs=1e-5)  # the correct answer's NLL per byte


def test_scores_match_hand_computed_sums_with_few_shots(byte_tok, make_bigram, bigram_lp):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(V, V, generator=g) * 2
    model = make_bigram(W)
    examples = [MCExample("Who?", ("me", "you", "them"), 2), MCExample("Why", ("so", "no"), 0),
                MCExample("How", ("fast", "slow"), 1)]
    result = evaluate_mc(model, byte_tok, examples, num_shots=1, seed=7, batch_size=2)
    correct = 0
    for i, (ex, pred) in enumerate(zip(examples, result.predictions)):
        prompt = build_prompt(ex, select_shots(examples, 1, seed=7, index=i, exclude_self=True))
        hand = []
        for choice in ex.choices:
            seq = list(prompt.encode()) + list(f" {choice}".encode())
            start = len(prompt.encode())
            hand.append(sum(bigram_lp(W, seq[t - 1], seq[t]) for t in range(start, len(seq))))
        assert pred.logprobs == pytest.approx(hand, abs=1e-3)
        assert pred.pred == max(range(len(hand)), key=hand.__getitem__)
        correct += pred.pred == ex.answer
    assert result.accuracy == correct / 3


def test_jsonl_errors_name_the_line(tmp_path):
    good = {"question": "q", "choices": ["a", "b"], "answer": 1}
    p = tmp_path / "t.jsonl"
    p.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    assert [e.answer for e in load_mc_jsonl(p)] == [1, 1]
    for bad, msg in [
        ("{not json", "t.jsonl:2: invalid JSON"),
        (json.dumps({"question": "q", "choices": ["a", "b"]}), "t.jsonl:2: missing field"),
        (json.dumps({**good, "answer": 2}), "t.jsonl:2: answer must be the index"),
        (json.dumps({**good, "choices": ["a"]}), "t.jsonl:2: choices must be"),
        (json.dumps({**good, "label": 0}), "t.jsonl:2: unknown field"),
    ]:
        p.write_text(json.dumps(good) + "\n" + bad + "\n")
        with pytest.raises(ValueError, match=msg):
            load_mc_jsonl(p)
    with pytest.raises(FileNotFoundError):
        load_mc_jsonl(tmp_path / "missing.jsonl")
