import json

import pytest
import torch

from herd.posttrain.data import (
    PackedBatches,
    PreferencePair,
    encode_dialog,
    pack_sft,
    read_chat_jsonl,
    read_preference_jsonl,
    write_chat_jsonl,
    write_preference_jsonl,
)
from herd.targets import IGNORE_INDEX
from herd.tokenizer import Message

DIALOG = [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!"),
          Message("user", "Bye"), Message("assistant", "See you.")]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_chat_jsonl_round_trip(tmp_path):
    path = write_chat_jsonl(tmp_path / "chat.jsonl", [DIALOG, DIALOG[1:3]])
    assert read_chat_jsonl(path) == [DIALOG, DIALOG[1:3]]


def test_preference_jsonl_round_trip_and_string_forms(tmp_path):
    pair = PreferencePair([Message("user", "2+2?")], Message("assistant", "4"), Message("assistant", "5"),
                          edited=Message("assistant", "4."))
    path = write_preference_jsonl(tmp_path / "p.jsonl", [pair])
    assert read_preference_jsonl(path) == [pair]
    short = _write(tmp_path / "s.jsonl", [json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"})])
    [p] = read_preference_jsonl(short)
    assert p.prompt == [Message("user", "2+2?")] and p.chosen.content == "4" and p.edited is None


GOOD_CHAT = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})


@pytest.mark.parametrize("bad, needle", [
    ("{not json", "not valid JSON"),
    (json.dumps({"msgs": []}), '"messages"'),
    (json.dumps({"messages": []}), "non-empty"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "b"}]}), "robot"),
    (json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}), "'content'"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}]}), "no assistant turn"),
    (json.dumps({"messages": [{"role": "user", "content": "a", "extra": 1}]}), "unknown message keys"),
    (json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}), "str"),
])
def test_malformed_chat_lines_name_the_line(tmp_path, bad, needle):
    path = _write(tmp_path / "chat.jsonl", [GOOD_CHAT, "", bad, GOOD_CHAT])
    with pytest.raises(ValueError) as err:
        read_chat_jsonl(path)
    assert "chat.jsonl:3:" in str(err.value) and needle in str(err.value)


GOOD_PAIR = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})


@pytest.mark.parametrize("bad, needle", [
    ("[1, 2]", "expected an object"),
    (json.dumps({"prompt": "q", "chosen": "a"}), "missing rejected"),
    (json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "score": 1}), "unknown keys"),
    (json.dumps({"prompt": [], "chosen": "a", "rejected": "b"}), "prompt must be"),
    (json.dumps({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
                 "chosen": "a", "rejected": "b"}), "ends with an assistant turn"),
    (json.dumps({"prompt": "q", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}), "assistant message"),
])
def test_malformed_preference_lines_name_the_line(tmp_path, bad, needle):
    path = _write(tmp_path / "pref.jsonl", [GOOD_PAIR, bad])
    with pytest.raises(ValueError) as err:
        read_preference_jsonl(path)
    assert "pref.jsonl:2:" in str(err.value) and needle in str(err.value)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_chat_jsonl(tmp_path / "nope.jsonl")


def test_packing_trains_exactly_the_assistant_tokens(fmt, tok):
    examples = [encode_dialog(fmt, DIALOG), encode_dialog(fmt, DIALOG[1:3]), encode_dialog(fmt, DIALOG[:3])]
    inputs, targets, doc_ids = pack_sft(examples, seq_len=256)
    assert inputs.shape[0] == 1  # all three fit in one row
    # Every row's targets, document by document, are the assistant tokens of that dialog, in order.
    for doc, ex in enumerate(sorted(examples, key=lambda e: -len(e.tokens))):
        sel = doc_ids[0] == doc
        trained = targets[0][sel]
        expected = [t for t, m in zip(ex.tokens, ex.assistant_mask) if m]
        assert trained[trained != IGNORE_INDEX].tolist() == expected
        assert inputs[0][sel].tolist() == ex.tokens[:-1]
        # A target is the next token of the same document (never the first token of the next one).
        ids = inputs[0][sel].tolist() + [ex.tokens[-1]]
        for j, t in enumerate(trained.tolist()):
            assert t == IGNORE_INDEX or t == ids[j + 1]
    assert (targets[doc_ids < 0] == IGNORE_INDEX).all()
    # What is trained is the assistant text and each turn's terminator, nothing of the headers.
    text = tok.decode([t for t in targets[0].tolist() if t != IGNORE_INDEX])
    assert text.count("Hello!<|eot_id|>") == 3 and text.count("See you.<|eot_id|>") == 1
    assert "Bye" not in text and "assistant" not in text and "<|start_header_id|>" not in text


def test_packing_rejects_overlong_examples(fmt):
    with pytest.raises(ValueError, match="seq_len"):
        pack_sft([encode_dialog(fmt, DIALOG)], seq_len=8)
    cut = encode_dialog(fmt, DIALOG, max_len=9)
    assert len(pack_sft([cut], seq_len=8)[0][0]) == 8


def test_packed_batches_resume_exactly(fmt):
    rows = pack_sft([encode_dialog(fmt, DIALOG)] * 5, seq_len=128)
    a = PackedBatches(*rows, batch_size=3, seed=1)
    a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch().inputs for _ in range(3)]
    b = PackedBatches(*rows, batch_size=3, seed=1)
    b.load_state_dict(state)
    assert all(torch.equal(x, b.next_batch().inputs) for x in expected)
