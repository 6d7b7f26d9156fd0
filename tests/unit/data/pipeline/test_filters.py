"""Each heuristic filter on crafted documents whose signals are computed by hand."""

import json
import math

import pytest

from herd.data.document import Document
from herd.data.steps.base import StepStats
from herd.data.steps.filters import (
    C4Filter,
    DirtyWords,
    FineWebFilter,
    GopherQuality,
    GopherRepetition,
    PiiMask,
    TokenKL,
    count_sentences,
    dup_ngram_chars,
    kl_divergence,
    top_ngram_chars,
)


def doc(text, **meta):
    return Document(id="d", text=text, metadata=dict(meta))


def run(step, texts):
    stats = StepStats(name=step.name, type=step.type)
    out = list(step([doc(t) for t in texts], stats))
    stats.check()
    return out, stats


# ---- Gopher repetition ---------------------------------------------------------------------------


def test_gopher_repetition_fractions_by_hand():
    text = "a b c\n\na b c\n\nd e f"  # 19 characters; the second paragraph (5 chars) repeats
    s = GopherRepetition().signals(text)
    assert s["dup_para_frac"] == pytest.approx(1 / 3)
    assert s["dup_para_char_frac"] == pytest.approx(5 / 19)
    assert s["dup_line_frac"] == pytest.approx(1 / 3)  # blank lines are not lines
    assert s["dup_line_char_frac"] == pytest.approx(5 / 19)
    # words a b c a b c d e f: top 2-gram "a b" (first of the two with count 2): 3 chars x 2
    assert s["top_2gram_char_frac"] == pytest.approx(6 / 19)
    assert s["top_3gram_char_frac"] == pytest.approx(2 * 5 / 19)  # "a b c" twice
    assert s["dup_5gram_char_frac"] == 0  # no 5-gram occurs twice in 9 words


def test_dup_ngram_scan_skips_n_words_after_a_repeat():
    ws = "one two three four five one two three four five".split()
    # The 5-gram at position 5 repeats position 0: 3+3+5+4+4 = 19 chars, then the scan jumps past the end.
    assert dup_ngram_chars(ws, 5) == 19
    assert dup_ngram_chars(ws, 6) == 0
    # "x x x x x x x" (7 words): 5-grams at 0 new, 1 repeat (+5, jump to 6): 6 > 7-5 stops
    assert dup_ngram_chars(["x"] * 7, 5) == 5
    assert top_ngram_chars(ws, 2) == len("one two") * 2
    assert top_ngram_chars("a b c d".split(), 2) == 0  # nothing repeats


def test_dup_ngram_scan_equals_the_plain_word_by_word_scan():
    # The scan jumps between repeated positions; the plain scan (Gopher's description, one step
    # per word) must give the same mass on texts with many overlapping and skipped repeats.
    import random

    def plain(ws, n):
        seen, chars, i = set(), 0, 0
        while i < len(ws) - n + 1:
            gram = tuple(ws[i:i + n])
            if gram in seen:
                chars += sum(map(len, gram))
                i += n
            else:
                seen.add(gram)
                i += 1
        return chars

    rng = random.Random(0)
    for _ in range(300):
        vocab = ["a" * rng.randint(1, 4) + str(k) for k in range(rng.randint(1, 8))]
        ws = [rng.choice(vocab) for _ in range(rng.randint(0, 120))]
        for n in range(1, 11):
            assert dup_ngram_chars(ws, n) == plain(ws, n), (ws, n)


def test_gopher_repetition_reasons_and_thresholds():
    text = "one two three four five one two three four five"
    s = GopherRepetition().signals(text)
    assert s["top_2gram_char_frac"] == pytest.approx(14 / 47)  # > 0.20: the first failing signal
    assert s["dup_5gram_char_frac"] == pytest.approx(19 / 47)
    ok, reason = GopherRepetition().filter(doc(text))
    assert (ok, reason) == (False, "gopher_top_2gram")

    def lines_doc(n_unique, n_ok):
        uniq = [" ".join(f"w{i}x{j}" for j in range(8)) for i in range(n_unique)]
        return "\n".join(uniq + ["ok"] * n_ok)

    # 6 unique lines + "ok" four times = 10 lines, 3 repeats: exactly 0.3 is kept (drop if > 0.3)
    assert GopherRepetition().signals(lines_doc(6, 4))["dup_line_frac"] == pytest.approx(0.3)
    assert GopherRepetition().filter(doc(lines_doc(6, 4))) == (True, None)
    assert GopherRepetition().signals(lines_doc(5, 5))["dup_line_frac"] == pytest.approx(0.4)
    assert GopherRepetition().filter(doc(lines_doc(5, 5))) == (False, "gopher_dup_line_frac")


# ---- Gopher quality ------------------------------------------------------------------------------


def prose(n_words):
    base = "the market opened with strong demand and that trend is expected to have lasting effects".split()
    return " ".join(base[i % len(base)] + ("" if i % 7 else ".") for i in range(n_words))


def test_gopher_quality_word_count_and_stop_words():
    g = GopherQuality()
    assert g.filter(doc(prose(50))) == (True, None)
    assert g.filter(doc(prose(49))) == (False, "gopher_too_few_words")
    # Symbol-only "words" do not count: 49 words + 10 dashes is still too few
    assert g.filter(doc(prose(49) + " -" * 10)) == (False, "gopher_too_few_words")
    no_stop = " ".join(["cats", "sit", "on", "mats"] * 20)
    assert g.filter(doc(no_stop)) == (False, "gopher_stop_words")
    # "the" alone is one stop word: still fewer than two distinct
    assert g.filter(doc(" ".join(["the", "cats", "sit", "mats"] * 20))) == (False, "gopher_stop_words")


def test_gopher_quality_ratios():
    g = GopherQuality()
    long_words = " ".join(["the", "and"] + ["extraordinarily"] * 60)  # mean length > 10
    assert g.filter(doc(long_words)) == (False, "gopher_long_mean_word")
    hashes = prose(60) + " #x" * 7  # 7 '#' in 67 words = 0.104 > 0.1
    assert g.filter(doc(hashes)) == (False, "gopher_hash_ratio")
    bullets = "\n".join(["- " + prose(6)] * 10)  # 10/10 bullet lines > 0.9
    assert g.filter(doc(bullets)) == (False, "gopher_bullet_lines")
    numbers = prose(50) + " 1234" * 15  # 15/65 = 0.23 words without letters: 0.77 < 0.8
    assert g.filter(doc(numbers)) == (False, "gopher_alpha_words")


# ---- C4 ------------------------------------------------------------------------------------------


def test_c4_line_rules_and_page_rules():
    page = "\n".join([
        "Home | About | Contact",                           # no terminal punctuation
        "This is the first real sentence of the page.",
        "Too short.",                                       # 2 words
        "Please enable JavaScript to view the comments.",   # javascript
        "Read our privacy policy before you continue.",    # policy
        "The second sentence has a citation[1] in it.",
        "A third sentence follows here. And a fourth one too!",
        "Finally the fifth sentence closes the page.",
    ])
    out, stats = run(C4Filter(), [page])
    assert len(out) == 1
    assert out[0].text.splitlines() == [
        "This is the first real sentence of the page.",
        "The second sentence has a citation in it.",
        "A third sentence follows here. And a fourth one too!",
        "Finally the fifth sentence closes the page.",
    ]
    assert stats.counters == {"lines_removed_no_terminal_punct": 1, "lines_removed_few_words": 1,
                              "lines_removed_javascript": 1, "lines_removed_policy": 1}
    assert stats.modified == 1
    _, stats = run(C4Filter(), ["Lorem ipsum dolor sit amet.", "x = {1: 2}. " * 5,
                                "Only one sentence survives here."])
    assert stats.dropped == {"c4_lorem_ipsum": 1, "c4_curly_bracket": 1, "c4_few_sentences": 1}


def test_sentence_count():
    assert count_sentences("One. Two! Three? Four") == 4
    assert count_sentences("Version 3.11 is out.") == 1


# ---- FineWeb -------------------------------------------------------------------------------------


def test_fineweb_rules_at_their_thresholds():
    f = FineWebFilter()
    long_line = "this line is comfortably longer than thirty characters"
    # 25 lines, 3 ending in '.': 0.12, which the paper drops (<= 0.12)
    lines = [f"{long_line} {i}." for i in range(3)] + [f"{long_line} {i}" for i in range(3, 25)]
    assert f.signals("\n".join(lines))["line_punct_frac"] == pytest.approx(0.12)
    assert f.filter(doc("\n".join(lines))) == (False, "fineweb_line_punct")
    lines[3] += "."  # 4/25 = 0.16 passes
    assert f.filter(doc("\n".join(lines))) == (True, None)
    short = "\n".join([f"short line {i}." for i in range(2)] + [f"{long_line} {i}." for i in range(1)])
    assert f.signals(short)["short_line_frac"] == pytest.approx(2 / 3)  # 0.667 < 0.67 passes
    assert f.filter(doc(short)) == (True, None)
    dup = "\n".join([f"{long_line} {i}." for i in range(9)] + [f"{long_line} 0."])
    s = f.signals(dup)
    assert s["dup_line_char_frac"] == pytest.approx(len(f"{long_line} 0.") / len(dup.replace("\n", "")))
    assert f.filter(doc(dup)) == (False, "fineweb_dup_line_chars")  # 0.1 >= 0.1


# ---- dirty words ---------------------------------------------------------------------------------


def test_dirty_words_count_on_word_boundaries():
    d = DirtyWords()
    assert d.count("A classic class assignment about bass.") == 0  # 'ass' inside words never matches
    assert d.count("Oh shit! This is bullshit, total SHIT.") == 3
    assert d.count("a blow job") == 1  # phrases match too
    out, stats = run(DirtyWords(), ["clean text here", "what the fuck"])
    assert [o.text for o in out] == ["clean text here"] and stats.dropped == {"dirty_words_count": 1}
    soft = DirtyWords(max_count=None, max_fraction=0.1)  # 1 hit in 10 words passes, 2 do not
    assert soft.filter(doc("shit " + "word " * 9)) == (True, None)
    assert soft.filter(doc("shit shit " + "word " * 8)) == (False, "dirty_words_fraction")


# ---- KL ------------------------------------------------------------------------------------------


def test_kl_divergence_by_hand():
    from collections import Counter

    ref = {"a": 3, "b": 1}
    kl = kl_divergence(Counter({"a": 1, "b": 1}), ref, ref_total=4, oov_count=0, alpha=0.0)
    assert kl == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    # An unseen token falls into the out-of-vocabulary bucket: q = (oov + alpha) / (total + oov + alpha * V)
    kl = kl_divergence(Counter({"zzz": 2}), ref, ref_total=4, oov_count=1, alpha=0.5)
    assert kl == pytest.approx(math.log(1.0 / ((1 + 0.5) / (4 + 1 + 0.5 * 3))))
    assert kl_divergence(Counter({"a": 3, "b": 1}), ref, ref_total=4, oov_count=0, alpha=0.0) == pytest.approx(0)


def test_token_kl_drops_outliers_against_a_reference_file(tmp_path):
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"counts": {"the": 50, "cat": 20, "sat": 20, "mat": 10}, "oov": 0}))
    step = TokenKL(reference=str(ref), min_tokens=5, max_kl=1.0, alpha=0.01)
    normal = "the cat sat the mat the cat sat the the"
    garbage = "qz7 xv9 kk2 pp0 zz1 yy3 ww4 the"
    short = "qz7 xv9"
    out, stats = run(step, [normal, garbage, short])
    assert [o.text for o in out] == [normal, short]
    assert stats.dropped == {"token_kl_outlier": 1} and stats.counters == {"too_short_to_score": 1}
    assert out[0].metadata["token_kl"] < 0.2


# ---- PII -----------------------------------------------------------------------------------------


def test_pii_masks_emails_and_public_ips_only():
    text = ("Mail jane.doe@example.org or ops@corp.co.uk; server 8.8.8.8, router 192.168.1.1, local 127.0.0.1, "
            "dns 2606:4700:4700::1111, docs 2001:db8::1 at 12:30:45.")
    out, stats = run(PiiMask(), [text])
    assert out[0].text == ("Mail email@example.com or email@example.com; server 192.0.2.1, router 192.168.1.1, "
                           "local 127.0.0.1, dns 192.0.2.1, docs 2001:db8::1 at 12:30:45.")
    assert stats.counters == {"emails_masked": 2, "ips_masked": 2} and stats.modified == 1
    again, _ = run(PiiMask(), [out[0].text])  # idempotent: placeholders are not PII
    assert again[0].text == out[0].text


def test_where_limits_a_filter_to_matching_documents():
    step = GopherQuality(where={"language": ["en"]})
    stats = StepStats(name="g", type="gopher_quality")
    docs = [doc("trop court", language="fr"), doc("too short", language="en")]
    out = list(step(docs, stats))
    stats.check()
    assert [d.text for d in out] == ["trop court"]
    assert stats.counters == {"not_applied": 1} and stats.dropped == {"gopher_too_few_words": 1}


def test_repeated_lines_removes_log_lines_and_keeps_prose():
    from herd.data.steps.filters import RepeatedLines

    log = "{} ERROR connection to db.example.com failed: timeout after 30 seconds, retrying"
    prose = ["The service writes a line to its log every time a request fails.",
             "Operators read the log when the error rate goes up after a deploy."]
    lines = prose[:1] + [log.format(f"2023-01-01T12:00:0{i}") for i in range(4)] + prose[1:]
    step = RepeatedLines()
    fr = step.line_fractions("\n".join(lines))
    # Each later log line repeats the first one's 10 words after its timestamp: the 5-gram at the
    # timestamp is new, the next two ("ERROR .. failed:", "timeout .. retrying") were seen, so
    # 10 of the line's 11 words are covered: their characters over the line's word characters.
    ws = lines[2].split()
    assert fr[2] == pytest.approx(sum(map(len, ws[1:11])) / sum(map(len, ws)))
    assert fr[0] == fr[1] == fr[-1] == 0
    out, stats = run(step, ["\n".join(lines)])
    assert out[0].text.split("\n") == [prose[0], lines[1], prose[1]]
    assert stats.counters == {"lines_removed": 3}
