"""The validation split by id hash: disjoint, covering, stable across orders, processes and releases."""

import subprocess
import sys

import pytest

from herd.data.corpora import Doc
from herd.data.split import is_validation, select_split, validation_score

DOCS = [Doc(id=f"wiki-en/Article {i}", text=f"text {i}", source="test") for i in range(20_000)]


def _ids(split, docs=DOCS, fraction=0.01):
    return [d.id for d in select_split(docs, split, val_fraction=fraction)]


def test_train_and_val_are_disjoint_and_cover_everything():
    train, val = _ids("train"), _ids("val")
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(d.id for d in DOCS)
    assert 130 <= len(val) <= 270  # 1% of 20,000 = 200; the binomial sd is 14


def test_split_is_stable_under_reordering_and_growth():
    val = set(_ids("val"))
    assert set(_ids("val", DOCS[::-1])) == val
    assert set(_ids("val", DOCS[:5000])) == {i for i in val if int(i.split()[-1]) < 5000}
    # A larger fraction only adds documents: nothing moves from validation back into training.
    assert val <= set(_ids("val", fraction=0.05))


def test_split_is_the_same_in_another_process():
    # Python's hash() is salted per process; the split must not be.
    code = ("from herd.data.split import is_validation; "
            "print(sum(is_validation(f'wiki-en/Article {i}', fraction=0.01) for i in range(20000)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert int(out.stdout) == len(_ids("val"))


def test_pinned_ids_keep_their_side():
    # Shards and tokenizers already made depend on these: a change of hash or salt must be deliberate.
    assert validation_score("austen/emma/048") == pytest.approx(0.0048812196, abs=1e-9)
    assert is_validation("austen/mansfieldpark/019", fraction=0.01)
    assert not is_validation("austen/emma/001", fraction=0.01)
    assert not is_validation("wiki-en/Albert Einstein", fraction=0.5)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        is_validation("x", fraction=1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        select_split(DOCS, "val", val_fraction=-0.1)
    with pytest.raises(ValueError, match="'train' or 'val'"):
        select_split(DOCS, "test", val_fraction=0.1)
    assert _ids("val", fraction=0.0) == []
