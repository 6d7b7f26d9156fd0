"""Dedup: URL keeps the newest crawl, exact, MinHash (S-curve and planted near-duplicates), and
line dedup's > 6 rule."""

import numpy as np
import pytest

from herd.data.document import Document
from herd.data.steps.dedup import (
    ExactDedup,
    LineDedup,
    MinHashDedup,
    UrlDedup,
    lsh_probability,
    normalize_line,
    normalize_url,
)


def test_lsh_probability_matches_published_s_curve():
    # FineWeb paper / research note: 14 x 8 gives 56%, 77%, 92%, 98.8% at s = 0.7, 0.75, 0.8, 0.85
    got = [lsh_probability(s, bands=14, rows=8) for s in (0.7, 0.75, 0.8, 0.85)]
    assert got == pytest.approx([0.565, 0.772, 0.924, 0.988], abs=1e-3)
    assert lsh_probability(0.794, bands=20, rows=13) == pytest.approx(1 - (1 - 0.794**13) ** 20)


@pytest.mark.parametrize("k, jaccard", [(11, 89 / 111), (33, 67 / 133)])
def test_minhash_candidate_rate_follows_one_minus_one_minus_s_to_the_r_to_the_b(k, jaccard):
    # Shingle sets {0..99} and {k..99+k} have Jaccard (100-k)/(100+k); over 300 seeds the share
    # of pairs sharing a band must match 1 - (1 - s^r)^b, and the share of equal rows must be s.
    a = [str(i) for i in range(100)]
    b = [str(i) for i in range(k, 100 + k)]
    hits, rows_equal = 0, []
    for seed in range(300):
        mh = MinHashDedup(seed=seed)
        sa, sb = mh.signature_of(a), mh.signature_of(b)
        rows_equal.append(np.mean(sa == sb))
        hits += bool((sa.reshape(14, 8) == sb.reshape(14, 8)).all(axis=1).any())
    p = lsh_probability(jaccard, bands=14, rows=8)
    sigma = (p * (1 - p) / 300) ** 0.5
    assert abs(hits / 300 - p) < 4 * sigma + 0.01
    assert np.mean(rows_equal) == pytest.approx(jaccard, abs=0.02)


def near_duplicate(rng, text, n_changes):
    ws = text.split()
    for _ in range(n_changes):
        ws[rng.randrange(len(ws))] = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(8))
    return " ".join(ws)


@pytest.mark.parametrize("scope, shards", [("global", 3), ("shard", 1)])
def test_minhash_removes_planted_near_duplicates_and_keeps_distinct_docs(tmp_path, rng, scope, shards, run_steps, random_words):
    originals = [random_words(rng, 300) for _ in range(20)]
    # 2 changed words out of 300 leave ~97% of 5-grams shared (Jaccard ~0.94): found with p > 0.999
    dups = [near_duplicate(rng, originals[i], 2) for i in range(5)]
    # Half the words changed: Jaccard of 5-grams ~0.02, never a candidate in practice
    distinct = [near_duplicate(rng, originals[i], 150) for i in range(5, 10)]
    docs = [Document(id=f"o{i}", text=t) for i, t in enumerate(originals)]
    docs += [Document(id=f"dup{i}", text=t) for i, t in enumerate(dups)]
    docs += [Document(id=f"far{i}", text=t) for i, t in enumerate(distinct)]
    out, stats = run_steps(tmp_path, docs, [MinHashDedup(scope=scope)], shards=shards)
    kept = {d.id for d in out}
    # Of each planted pair exactly one survives (which one depends on the shard order); everything else stays.
    assert all(len(kept & {f"o{i}", f"dup{i}"}) == 1 for i in range(5))
    assert {f"o{i}" for i in range(5, 20)} | {f"far{i}" for i in range(5)} <= kept
    assert len(kept) == 25 and stats["minhash"].dropped == {"minhash_duplicate": 5}


def test_minhash_by_language_never_merges_across_languages(tmp_path, rng, run_steps, random_words):
    text = random_words(rng, 200)
    docs = [Document(id="en", text=text, metadata={"language": "en"}),
            Document(id="fr", text=text, metadata={"language": "fr"}),
            Document(id="fr2", text=text, metadata={"language": "fr"})]
    out, _ = run_steps(tmp_path, docs, [MinHashDedup(by="language")])
    assert [d.id for d in out] == ["en", "fr"]


def test_url_dedup_keeps_the_newest_capture(tmp_path, run_steps, random_words):
    docs = [
        Document(id="old", text="v1", url="http://Example.com/page/", timestamp="2021-03-01T00:00:00Z"),
        Document(id="new", text="v3", url="https://example.com/page#top", timestamp="2023-11-30T12:00:00Z"),
        Document(id="mid", text="v2", url="https://example.com/page?utm_source=x", timestamp="2022-06-01T00:00:00Z"),
        Document(id="other", text="v", url="https://example.com/other", timestamp="2020-01-01T00:00:00Z"),
        Document(id="nourl", text="v"),
    ]
    out, stats = run_steps(tmp_path, docs, [UrlDedup()], shards=2)
    assert sorted(d.id for d in out) == ["new", "nourl", "other"]
    assert stats["url_dedup"].dropped == {"url_duplicate_older": 2}
    assert normalize_url("HTTP://Example.COM:80/a/?b=1&utm_medium=y#f") == "http://example.com/a?b=1"


def test_exact_dedup_keeps_first(tmp_path, run_steps, random_words):
    docs = [Document(id=str(i), text=t) for i, t in enumerate(["a b", "c", "a b ", "c", "d"])]
    out, stats = run_steps(tmp_path, docs, [ExactDedup()])
    assert [d.id for d in out] == ["0", "1", "4"] and stats["exact_dedup"].dropped == {"exact_duplicate": 2}


def test_line_dedup_removes_lines_seen_more_than_six_times(tmp_path, rng, run_steps, random_words):
    seven = "Copyright 2024 Example Corp. All rights reserved."
    six = "Share this page on social media"
    docs = []
    for i in range(10):
        lines = [f"unique content line {i} " + random_words(rng, 5)]
        if i < 7:  # 7 occurrences, with different digits and case: the same line after normalising
            lines.append(seven.replace("2024", str(2000 + i)).upper() if i % 2 else seven)
        if i < 6:
            lines.append(six)
        docs.append(Document(id=str(i), text="\n".join(lines)))
    out, stats = run_steps(tmp_path, docs, [LineDedup()], shards=3)
    text = "\n".join(d.text for d in out)
    assert "copyright" not in text.lower()
    assert text.count(six) == 6
    assert stats["line_dedup"].counters == {"lines_removed": 7}
    assert normalize_line("Copyright 2019, Example!") == normalize_line("COPYRIGHT 2024 example")


def test_line_dedup_counts_per_bucket(tmp_path, run_steps, random_words):
    # 14 docs carrying the same line, buckets of 7 docs: 7 per bucket > 6 -> removed in both;
    # buckets of 10 docs: 10 then 4 -> removed only in the first bucket. Buckets follow the
    # executor's order, shard by shard: shard 0 holds docs 0, 2, .., 12 and shard 1 docs 1, 3, .., 13.
    docs = [Document(id=str(i), text=f"same boilerplate line\nbody {i}") for i in range(14)]
    out, _ = run_steps(tmp_path, docs, [LineDedup(bucket_size=7)], shards=2)
    assert sum("boilerplate" in d.text for d in out) == 0
    out, _ = run_steps(tmp_path / "b", docs, [LineDedup(bucket_size=10)], shards=2)
    kept = sorted(int(d.id) for d in out if "boilerplate" in d.text)
    assert kept == [7, 9, 11, 13]


def test_line_dedup_where_leaves_other_documents_alone(tmp_path, run_steps):
    # "return None" in 8 code files and 8 web pages: counted and removed in the pages only, where
    # 8 > 6; the code's 8 copies neither count towards the pages' total nor lose the line.
    # (Bodies differ in letters: line normalisation maps every digit to 0.)
    web = [Document(id=f"w{i}", text=f"return None\npage body {'abcdefgh'[i]}", metadata={"source": "web"})
           for i in range(8)]
    code = [Document(id=f"c{i}", text=f"def f{i}():\n    return None", metadata={"source": "code"}) for i in range(8)]
    out, stats = run_steps(tmp_path, web + code, [LineDedup(where={"source": "web"})], shards=2)
    by_id = {d.id: d.text for d in out}
    assert all(by_id[f"w{i}"] == f"page body {'abcdefgh'[i]}" for i in range(8))
    assert all(by_id[f"c{i}"].endswith("return None") for i in range(8))
    assert stats["line_dedup"].counters == {"lines_removed": 8, "not_applied": 8}
    # 5 pages + 8 code files: the pages alone are under the threshold.
    out, _ = run_steps(tmp_path / "b", web[:5] + code, [LineDedup(where={"source": "web"})], shards=2)
    assert sum("return None" in d.text for d in out) == 13
