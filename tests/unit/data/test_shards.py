"""Token shards: round trip, atomic completion, clear errors, parallel tokenization and resume after a kill."""

import json
import multiprocessing
import os
import signal
import time
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest

from herd.data.shards import ShardWriter, open_shards, read_meta, tokenize_to_shards
from herd.tokenizer import Tokenizer


def _random_docs(n, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(0, 300))) for _ in range(n)]


def test_round_trip_across_several_shards(tmp_path):
    docs = _random_docs(200, 1000) + [np.arange(1500) % 1000]  # the last one is longer than a shard
    with ShardWriter(tmp_path, vocab_size=1000, tokenizer_sha256="ab" * 32, max_tokens_per_shard=1000,
                     source="unit", bos=998, eos=999) as w:
        for d in docs:
            w.add(d if len(d) % 2 else d.tolist())  # arrays and lists alike
    info = read_meta(tmp_path)
    assert len(info.shards) > 10 and all(s.num_tokens <= 1000 or s.num_docs == 1 for s in info.shards)
    assert (info.num_docs, info.num_tokens) == (len(docs), sum(len(d) for d in docs))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert set(meta) == {"format", "vocab_size", "tokenizer_sha256", "bos", "eos", "num_docs", "num_tokens",
                         "shards", "source"}
    assert (meta["format"], meta["bos"], meta["eos"], meta["source"]) == ("herd-shards-v1", 998, 999, "unit")
    shards = open_shards(tmp_path)
    assert shards.num_docs == len(docs)
    np.testing.assert_array_equal(shards.doc_lengths, [len(d) for d in docs])
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(shards.doc(i), d)
    # The files are exactly the documented layout: flat little-endian uint32 and int64 offsets.
    first = info.shards[0]
    raw = np.fromfile(tmp_path / first.file, dtype="<u4")
    off = np.load(tmp_path / first.file.replace(".bin", ".idx.npy"))
    assert off.dtype == np.int64 and off.shape == (first.num_docs + 1,)
    np.testing.assert_array_equal(raw[off[1] : off[2]], docs[1])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_an_exception_leaves_an_incomplete_directory_that_says_so(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, vocab_size=100, max_tokens_per_shard=10) as w:
            for d in _random_docs(20, 100):
                w.add(d)
            raise RuntimeError("killed")
    assert not (tmp_path / "meta.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ValueError, match="incomplete.*herd data tokenize"):
        open_shards(tmp_path)
    # The next writer clears the leftovers instead of mixing them in.
    with ShardWriter(tmp_path, vocab_size=100) as w:
        w.add([1, 2, 3])
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["meta.json", "shard_00000.bin", "shard_00000.idx.npy"]


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="herd data tokenize"):
        open_shards(tmp_path / "nope")
    with ShardWriter(tmp_path / "a", vocab_size=100) as w:
        with pytest.raises(ValueError, match="token id 100 is outside the vocabulary 0..99"):
            w.add([5, 100])
        with pytest.raises(ValueError, match="1-D"):
            w.add([[1, 2]])
        w.add([1, 2, 3])
    with pytest.raises(ValueError, match="already holds a complete shard set"):
        ShardWriter(tmp_path / "a", vocab_size=100)
    with open(tmp_path / "a" / "shard_00000.bin", "ab") as f:
        f.write(b"\0\0\0\0")  # a damaged shard
    with pytest.raises(ValueError, match="expected 12"):
        open_shards(tmp_path / "a")


@pytest.fixture(scope="module")
def paragraphs(topic_texts):
    return [p for t in topic_texts for p in t.split("\n\n") if p.strip()]


def test_tokenize_matches_the_tokenizer_and_does_not_depend_on_workers(tmp_path, small_tokenizer, paragraphs):
    docs = paragraphs[:600]
    infos = [tokenize_to_shards(docs, tmp_path / f"w{n}", tokenizer_path=small_tokenizer, num_workers=n,
                                max_tokens_per_shard=5000, batch_chars=4000) for n in (0, 2)]
    tok = Tokenizer.from_file(small_tokenizer)
    assert infos[0].bos == tok.bos_id and infos[0].eos == tok.eos_id and infos[0].vocab_size == tok.n_words
    a, b = open_shards(tmp_path / "w0"), open_shards(tmp_path / "w2")
    assert len(infos[0].shards) == len(infos[1].shards) > 3
    for i, text in enumerate(docs):
        expected = tok.encode(text, bos=True, eos=True)
        assert a.doc(i).tolist() == expected and b.doc(i).tolist() == expected
    assert not (tmp_path / "w2" / ".progress.json").exists()


def _files(d):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in d.iterdir() if p.name.startswith("shard_")}


def test_killed_worker_pool_resumes_without_redoing_finished_shards(tmp_path, small_tokenizer, paragraphs):
    docs = paragraphs[:1500]
    out = tmp_path / "out"
    kw = dict(tokenizer_path=small_tokenizer, max_tokens_per_shard=3000, batch_chars=2000)

    def docs_with_a_kill():
        # The parent thread both pulls documents and writes finished shards, so killing a worker
        # from inside the document stream, two thirds in, lands mid-run deterministically (a
        # timed killer thread raced the pool on a loaded machine). The pause lets the executor
        # notice the dead worker before the next submission.
        for i, d in enumerate(docs):
            if i == 2 * len(docs) // 3:
                os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
                time.sleep(1.0)
            yield d

    with pytest.raises(BrokenProcessPool):
        tokenize_to_shards(docs_with_a_kill(), out, num_workers=2, **kw)

    # Nothing corrupt under a final name, no meta.json, and the finished shards are on record.
    assert not (out / "meta.json").exists()
    for idx in out.glob("shard_*.idx.npy"):
        assert (out / idx.name.replace(".idx.npy", ".bin")).stat().st_size == 4 * int(np.load(idx)[-1])
    recorded = json.loads((out / ".progress.json").read_text())["shards"]
    assert len(recorded) >= 2
    before = {k: v for k, v in _files(out).items() if k.split(".")[0] in {r["file"][:-4] for r in recorded}}
    skipped = sum(r["num_docs"] for r in recorded)

    calls = []
    info = tokenize_to_shards(docs, out, num_workers=2, progress=lambda d, t: calls.append(d), **kw)
    assert calls[0] > skipped  # counting starts after the skipped documents: they were not re-tokenized
    after = _files(out)
    assert all(after[k] == v for k, v in before.items())  # finished shards were not rewritten

    clean = tokenize_to_shards(docs, tmp_path / "clean", num_workers=0, **kw)
    assert info.shards == clean.shards
    a, b = open_shards(out), open_shards(tmp_path / "clean")
    for i in range(a.num_docs):
        np.testing.assert_array_equal(a.doc(i), b.doc(i))


def test_resume_refuses_other_documents_or_settings(tmp_path, small_tokenizer, paragraphs):
    docs = paragraphs[:400]
    kw = dict(tokenizer_path=small_tokenizer, max_tokens_per_shard=2000, batch_chars=1000)

    def failing(after):
        for i, d in enumerate(docs):
            if i == after:
                raise KeyboardInterrupt  # the user pressed Ctrl-C
            yield d

    with pytest.raises(KeyboardInterrupt):
        tokenize_to_shards(failing(300), tmp_path, num_workers=0, **kw)
    assert json.loads((tmp_path / ".progress.json").read_text())["shards"]
    with pytest.raises(ValueError, match="other settings"):
        tokenize_to_shards(docs, tmp_path, num_workers=0, bos=False, **kw)
    with pytest.raises(ValueError, match="differ"):
        tokenize_to_shards(["changed"] + docs[1:], tmp_path, num_workers=0, **kw)
    done = tokenize_to_shards(docs, tmp_path, num_workers=0, **kw)
    assert done.num_docs == len(docs)
    # A complete directory is returned as it is, or rebuilt when resume is off.
    assert tokenize_to_shards(docs, tmp_path, num_workers=0, **kw) == done
    with pytest.raises(ValueError, match="other settings"):
        tokenize_to_shards(docs, tmp_path, num_workers=0, eos=False, **kw)
    redone = tokenize_to_shards(docs[:10], tmp_path, num_workers=0, resume=False, **kw)
    assert redone.num_docs == 10 and open_shards(tmp_path).num_docs == 10
