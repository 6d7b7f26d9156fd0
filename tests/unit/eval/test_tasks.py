import json

import pytest

from herd.eval.multiple_choice import load_mc_jsonl
from herd.eval.tasks import next_sentence_task, sentences, write_task

DOCS = [f"Topic {i} is a place. It lies near river {i}. Its people farm barley number {i} here." for i in range(12)]


def test_sentence_split():
    assert sentences("Llamas graze. Do they? Yes! they do.  Alpacas too.") == \
        ["Llamas graze.", "Do they?", "Yes! they do.", "Alpacas too."]


def test_each_item_has_its_own_next_sentence_and_distractors_from_other_documents(tmp_path):
    items = next_sentence_task(DOCS, n=10, choices=4, seed=1)
    assert len(items) == 10
    for i, item in enumerate(items):
        assert item["question"] == f"Topic {i} is a place. It lies near river {i}."
        assert item["choices"][item["answer"]] == f"Its people farm barley number {i} here."
        others = [c for k, c in enumerate(item["choices"]) if k != item["answer"]]
        assert len(set(item["choices"])) == 4 and all(f"number {i} " not in c for c in others)
    answers = {item["answer"] for item in items}
    assert len(answers) > 1  # shuffled, not always in the same slot
    loaded = load_mc_jsonl(write_task(items, tmp_path / "t.jsonl"))  # the format herd eval mc reads
    assert [e.answer for e in loaded] == [it["answer"] for it in items]
    assert json.loads((tmp_path / "t.jsonl").read_text().splitlines()[0])["question"].startswith("Topic 0")


def test_too_few_documents_is_a_clear_error():
    with pytest.raises(ValueError, match="need at least 4"):
        next_sentence_task(DOCS[:2], n=5)
    with pytest.raises(ValueError, match="choices"):
        next_sentence_task(DOCS, n=5, choices=1)


def test_long_documents_give_several_windows_and_long_items_are_skipped():
    chapter = " ".join(f"Sentence number {k} of the chapter." for k in range(9))
    items = next_sentence_task([chapter, *DOCS], n=50, choices=3, context_sentences=2, per_doc=5, seed=0)
    firsts = [it for it in items if it["question"].startswith("Sentence number")]
    # 9 sentences in windows of 3: contexts at 0-1, 3-4, 6-7, each followed by its own next sentence.
    assert [it["question"] for it in firsts] == [f"Sentence number {k} of the chapter. Sentence number {k + 1} of "
                                                 f"the chapter." for k in (0, 3, 6)]
    for it in firsts:
        k = int(it["question"].split()[2])
        assert it["choices"][it["answer"]] == f"Sentence number {k + 2} of the chapter."
    short = next_sentence_task([chapter, *DOCS], n=50, choices=3, per_doc=5, max_chars=90, seed=0)
    assert short and all(len(it["question"]) + max(map(len, it["choices"])) <= 90 for it in short)


def test_max_choice_chars_bounds_every_choice():
    docs = [*DOCS, "A b. C d. " + "Long " * 40 + "sentence."]
    items = next_sentence_task(docs, n=50, choices=3, max_choice_chars=45, seed=0)
    assert items and all(max(map(len, it["choices"])) <= 45 for it in items)
