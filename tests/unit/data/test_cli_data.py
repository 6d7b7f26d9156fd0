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


def test_train_classifier_command_learns_a_separable_labelling(tmp_path, capsys):
    """Prose about animals vs. Python-like code: a fastText classifier trained through the CLI must
    separate held-out examples of both, and the pipeline's classify step must load the file."""
    import random

    from herd.data.steps.classifiers import load_scorer

    rng = random.Random(0)
    animals = "llama alpaca camel grass hay valley river herd wool mountain farmer sleeps eats walks".split()
    code = "def return import self None for in range if else lambda yield class print len".split()

    def write(path, words, n):
        with open(path, "w") as f:
            for i in range(n):
                text = " ".join(rng.choice(words) for _ in range(rng.randint(60, 120)))
                f.write(json.dumps({"id": f"{path.stem}-{i}", "text": text}) + "\n")
        return path

    prose, src = write(tmp_path / "prose.jsonl", animals, 150), write(tmp_path / "code.jsonl", code, 150)
    out = tmp_path / "models" / "domain.bin"
    assert main(["data", "train-classifier", "--example", f"prose={prose}", "--example", f"code={src}",
                 "--out", str(out), "--epochs", "5"]) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy 1.000" in printed and out.is_file()
    info = json.loads(out.with_name("domain.bin.json").read_text())
    assert info["examples_per_label"] == {"prose": 150, "code": 150}
    # Fresh documents from the same two sources, never seen in training, are told apart.
    fresh = {label: [" ".join(rng.choice(words) for _ in range(80)) for _ in range(10)]
             for label, words in (("prose", animals), ("code", code))}
    scorer = load_scorer(out)
    for label, texts in fresh.items():
        assert all(p[label] > 0.9 for p in scorer.probs(texts)), label

    # User errors: one label only, an unreadable source, a malformed --example.
    assert main(["data", "train-classifier", "--example", f"prose={prose}", "--out", str(out)]) == 2
    assert "at least two labels" in capsys.readouterr().err
    assert main(["data", "train-classifier", "--example", "a=nowhere.jsonl", "--example", f"b={src}",
                 "--out", str(out)]) == 2
    assert "neither a file nor a folder" in capsys.readouterr().err
    assert main(["data", "train-classifier", "--example", str(prose), "--example", f"b={src}", "--out", str(out)]) == 2
    assert "LABEL=SOURCE" in capsys.readouterr().err
