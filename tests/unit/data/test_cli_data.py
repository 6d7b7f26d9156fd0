"""`herd tokenizer train` and `herd data tokenize` end to end on a JSONL file, read back by the loader."""

import json

from herd.cli import main
from herd.data.loader import PackedLoader
from herd.data.shards import open_shards
from herd.data.split import is_validation
from herd.tokenizer import Tokenizer


def test_train_tokenize_and_load(tmp_path, topic_texts, capsys):
    corpus = tmp_path / "topics.jsonl"
    docs = [{"id": f"topic-{i}", "text": t} for i, t in enumerate(topic_texts)]
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tok_path = tmp_path / "tok" / "tokenizer.model"
    assert main(["tokenizer", "train", "--sources", str(corpus), "--vocab-size", "600", "--out", str(tok_path),
                 "--val-fraction", "0.1"]) == 0
    assert "trained 600 BPE tokens" in capsys.readouterr().out
    assert main(["data", "tokenize", "--sources", str(corpus), "--tokenizer", str(tok_path), "--out",
                 str(tmp_path / "shards"), "--val-fraction", "0.1", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "train:" in out and "val:" in out
    n_val = sum(is_validation(d["id"], fraction=0.1) for d in docs)
    assert 0 < n_val < len(docs)
    assert open_shards(tmp_path / "shards" / "val").num_docs == n_val
    train = open_shards(tmp_path / "shards" / "train")
    assert train.num_docs == len(docs) - n_val
    assert train.vocab_size == Tokenizer.from_file(tok_path).n_words == 856
    batch = PackedLoader([tmp_path / "shards" / "train"], seq_len=32, batch_size=2, seed=0).next_batch()
    assert batch.inputs.shape == (2, 32)


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "tokenize", "--sources", "wiki-xx", "--out", str(tmp_path)]) == 2
    assert "unknown source 'wiki-xx'" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--sources", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "t")]) == 2
    assert "does not exist" in capsys.readouterr().err
