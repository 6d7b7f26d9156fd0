"""Heuristic filters of Llama 3 §3.1.1 and the rule sets it builds on (Gopher, C4, FineWeb), dirty
words, and PII masking: each a function of one document. The token-distribution KL filter, which
compares a document with the whole corpus, is a global step in `herd.data.steps.token_kl`.

Trade-off: each filter is a pure function of one document (plus, for KL, one reference
distribution) with every threshold a dataclass field whose comment names its source, so a
threshold table can be checked against the code line by line and the tests can hand-compute
each signal. Signals use whitespace words, the unit of the original Gopher description; datatrove
tokenises with spaCy, which splits punctuation off and gives slightly different fractions on
punctuation-heavy text. The price of pure Python is speed (Gopher repetition is the slowest
heuristic, ~150-200 docs/s per core in the research note); it is still far from the extractor's
cost per page.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from itertools import filterfalse
from importlib import resources
from pathlib import Path
from typing import ClassVar

import numpy as np

from herd.data.document import Document
from herd.data.steps.base import Filter, Modifier, StepStats, matches, words
# Re-exported: the KL step lived here before it moved to its own module.
from herd.data.steps.token_kl import TokenKL, kl_divergence  # noqa: F401

# ---- Gopher repetition (Rae et al. 2021, Table A1; datatrove GopherRepetitionFilter) -------------


def find_duplicates(items: list[str]) -> tuple[int, int]:
    """(number of repeated items, their characters): the first occurrence is not a repeat."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant for rolling n-gram hashes


class _Words:
    """Whitespace words of a text as 64-bit hashes and lengths, so that n-gram counting runs on
    numpy arrays instead of tuples of strings (the Gopher signals are 5-10x faster this way)."""

    def __init__(self, ws: list[str]) -> None:
        self.ws = ws
        # Python's str hash: salted per process, which is fine for counts within one document.
        self.h = np.fromiter(map(hash, ws), dtype=np.int64, count=len(ws)).view(np.uint64)
        self.cum = np.zeros(len(ws) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, ws), dtype=np.int64, count=len(ws)), out=self.cum[1:])

    def ngrams(self, n: int) -> np.ndarray:
        """(len(ws) - n + 1,) hashes of the word n-grams starting at each position."""
        h = self.h[: len(self.h) - n + 1].copy()
        with np.errstate(over="ignore"):  # wrap-around is the hash
            for j in range(1, n):
                h = h * _MUL + self.h[j : len(self.h) - n + 1 + j]
        return h

    def chars(self, i: int, n: int) -> int:
        """Characters of words i..i+n-1 (without separators)."""
        return int(self.cum[i + n] - self.cum[i])


def top_ngram_chars(ws: list[str] | _Words, n: int) -> int:
    """Characters covered by the most frequent word n-gram: len(" ".join(ngram)) * count (ties go
    to the n-gram seen first, as Counter.most_common does); 0 when no n-gram repeats."""
    w = ws if isinstance(ws, _Words) else _Words(ws)
    if len(w.ws) < n:
        return 0
    uniq, first, counts = np.unique(w.ngrams(n), return_index=True, return_counts=True)
    top = counts.max()
    if top < 2:
        return 0
    i = int(first[counts == top].min())
    return (w.chars(i, n) + n - 1) * int(top)


def dup_ngram_chars(ws: list[str] | _Words, n: int) -> int:
    """Gopher's duplicated n-gram mass: scan left to right; a seen n-gram adds its characters
    (words joined without spaces) and skips n words, so overlapping repeats count once."""
    w = ws if isinstance(ws, _Words) else _Words(ws)
    if len(w.ws) < n:
        return 0
    h = w.ngrams(n)
    _, first = np.unique(h, return_index=True)
    if len(first) == len(h):  # no n-gram occurs twice: nothing to scan (the common case)
        return 0
    # Only a position whose n-gram occurred earlier can be "seen"; the first occurrences between
    # two such positions are just recorded, in bulk. Same scan, a Python step per repeat only.
    is_first = np.zeros(len(h), dtype=bool)
    is_first[first] = True
    hs = h.tolist()
    cum = w.cum.tolist()
    seen: set[int] = set()
    chars = i = 0
    for j in np.flatnonzero(~is_first).tolist():
        if j < i:  # inside a repeat that was skipped over
            continue
        seen.update(hs[i:j])
        if hs[j] in seen:
            chars += cum[j + n] - cum[j]
            i = j + n
        else:  # its earlier occurrence was skipped, so it was never recorded
            seen.add(hs[j])
            i = j + 1
    return chars


@dataclass
class GopherRepetition(Filter):
    type: ClassVar[str] = "gopher_repetition"
    name: str = "gopher_repetition"
    dup_line_frac: float = 0.3        # Gopher Table A1
    dup_para_frac: float = 0.3        # Gopher Table A1
    dup_line_char_frac: float = 0.2   # Gopher Table A1
    dup_para_char_frac: float = 0.2   # Gopher Table A1
    top_ngram_char_frac: dict[str, float] = field(default_factory=lambda: {"2": 0.20, "3": 0.18, "4": 0.16})
    dup_ngram_char_frac: dict[str, float] = field(
        default_factory=lambda: {"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12, "9": 0.11, "10": 0.10})

    def _signals(self, text: str) -> Iterator[tuple[str, float, float]]:
        """(signal, value, threshold) in datatrove's order, computed lazily so the filter stops at
        the first failure."""
        size = max(len(text), 1)
        paras = re.split(r"\n{2,}", text.strip())
        n, c = find_duplicates(paras)
        yield "dup_para_frac", n / max(len(paras), 1), self.dup_para_frac
        yield "dup_para_char_frac", c / size, self.dup_para_char_frac
        lines = [ln for ln in re.split(r"\n+", text) if ln]
        n, c = find_duplicates(lines)
        yield "dup_line_frac", n / max(len(lines), 1), self.dup_line_frac
        yield "dup_line_char_frac", c / size, self.dup_line_char_frac
        w = _Words(words(text))
        for k, thr in self.top_ngram_char_frac.items():
            yield f"top_{k}gram_char_frac", top_ngram_chars(w, int(k)) / size, thr
        for k, thr in self.dup_ngram_char_frac.items():
            yield f"dup_{k}gram_char_frac", dup_ngram_chars(w, int(k)) / size, thr

    def signals(self, text: str) -> dict[str, float]:
        """Every repetition fraction of the document (the tests check these by hand)."""
        return {name: value for name, value, _ in self._signals(text)}

    def filter(self, doc: Document) -> tuple[bool, str | None]:
        for name, value, thr in self._signals(doc.text):
            if value > thr:
                return False, "gopher_" + name.removesuffix("_char_frac") if "gram" in name else "gopher_" + name
        return True, None


@dataclass
class RepeatedLines(Modifier):
    """Llama 3 §3.1.1's use of duplicated n-gram coverage: remove *lines* of repeated content such
    as logs or error messages, which line dedup misses because each line differs (a timestamp,
    a counter). Gopher's scan runs over the whole document with one set of seen n-grams; a line
    whose characters are more than `max_dup_frac` covered by n-grams seen earlier (in earlier
    lines or earlier in itself) is removed. The paper gives no threshold: 0.5 removes a line
    that mostly repeats and keeps prose that quotes a phrase. On the demo corpus it removes shell
    sessions, `ls -l` listings and syslog excerpts, and also formulaic reference sentences
    ("Changed in version 3.6: Accepts a path-like object ...") that repeat within one page."""

    type: ClassVar[str] = "repeated_lines"
    name: str = "repeated_lines"
    n: int = 5
    max_dup_frac: float = 0.5
    min_words: int = 5  # shorter lines are line dedup's business

    def line_fractions(self, text: str) -> list[float]:
        """Duplicated n-gram character fraction of each line, in order (0 for short lines)."""
        seen: set[tuple[str, ...]] = set()
        out = []
        for line in text.split("\n"):
            ws = line.split()
            if len(ws) < max(self.n, self.min_words):
                out.append(0.0)
                continue
            chars = i = 0
            while i < len(ws) - self.n + 1:
                gram = tuple(ws[i:i + self.n])
                if gram in seen:
                    chars += sum(map(len, gram))
                    i += self.n
                else:
                    seen.add(gram)
                    i += 1
            seen.update(tuple(ws[j:j + self.n]) for j in range(len(ws) - self.n + 1))
            out.append(chars / sum(map(len, ws)))
        return out

    def modify(self, doc: Document, stats: StepStats) -> str:
        lines = doc.text.split("\n")
        keep = [ln for ln, f in zip(lines, self.line_fractions(doc.text)) if f <= self.max_dup_frac]
        stats.counters["lines_removed"] += len(lines) - len(keep)
        return "\n".join(keep)


# ---- Gopher quality (Rae et al. 2021 §A.1.1; datatrove GopherQualityFilter) ----------------------

PUNCTUATION = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~…–—“”‘’«»¿¡·•")
STOP_WORDS_EN = ("the", "be", "to", "of", "and", "that", "have", "with")
_PUNCT_SET = frozenset(PUNCTUATION)


@dataclass
class GopherQuality(Filter):
    type: ClassVar[str] = "gopher_quality"
    name: str = "gopher_quality"
    min_words: int = 50                   # Gopher
    max_words: int = 100_000              # Gopher
    min_mean_word_len: float = 3          # Gopher
    max_mean_word_len: float = 10         # Gopher
    max_symbol_word_ratio: float = 0.1    # Gopher: '#' and '...' per word
    max_bullet_lines_frac: float = 0.9    # Gopher
    max_ellipsis_lines_frac: float = 0.3  # Gopher
    min_alpha_words_frac: float = 0.8     # Gopher
    min_stop_words: int = 2               # Gopher: "at least two of" the stop words (distinct)
    stop_words: list[str] = field(default_factory=lambda: list(STOP_WORDS_EN))

    def filter(self, doc: Document) -> tuple[bool, str | None]:
        text = doc.text
        ws = words(text)
        # C-level loops (set.issuperset, map) instead of a generator per word: same result, ~5x faster.
        content = list(filterfalse(_PUNCT_SET.issuperset, ws))
        if len(content) < self.min_words:
            return False, "gopher_too_few_words"
        if len(content) > self.max_words:
            return False, "gopher_too_many_words"
        mean_len = sum(map(len, content)) / len(content)
        if mean_len < self.min_mean_word_len:
            return False, "gopher_short_mean_word"
        if mean_len > self.max_mean_word_len:
            return False, "gopher_long_mean_word"
        if text.count("#") / len(ws) > self.max_symbol_word_ratio:
            return False, "gopher_hash_ratio"
        if (text.count("...") + text.count("…")) / len(ws) > self.max_symbol_word_ratio:
            return False, "gopher_ellipsis_ratio"
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if lines:
            if sum(ln.lstrip().startswith(("•", "-")) for ln in lines) / len(lines) > self.max_bullet_lines_frac:
                return False, "gopher_bullet_lines"
            if sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines) > self.max_ellipsis_lines_frac:
                return False, "gopher_ellipsis_lines"
        alpha = {w for w in set(ws) if w.isalpha() or any(map(str.isalpha, w))}  # each distinct word once
        if sum(map(alpha.__contains__, ws)) / len(ws) < self.min_alpha_words_frac:
            return False, "gopher_alpha_words"
        stop = set(self.stop_words)
        if len(stop & set(map(str.lower, ws))) < self.min_stop_words:
            return False, "gopher_stop_words"
        return True, None


# ---- C4 (Raffel et al. 2020; TFDS c4_utils; datatrove C4QualityFilter) ---------------------------

_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.I)
_SENTENCE_END = re.compile(r"[.!?]+(?:[\"')\]]*)(?=\s|$)")
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


def count_sentences(text: str) -> int:
    """Sentence ends (runs of . ! ? followed by space or the end); a regex stand-in for C4's
    sentence splitter, which also counts a trailing fragment as a sentence."""
    n = len(_SENTENCE_END.findall(text))
    tail = _SENTENCE_END.split(text)[-1].strip() if text.strip() else ""
    return n + (1 if tail else 0)


@dataclass
class C4Filter(Modifier):
    """C4's rules: removes failing lines, then drops the page on the page-level rules."""

    type: ClassVar[str] = "c4"
    name: str = "c4"
    terminal_punct: bool = True      # C4; FineWeb turns it off (it removed ~30% of tokens)
    min_words_per_line: int = 3      # C4
    max_word_len: int = 1000         # C4
    min_sentences: int = 5           # C4
    remove_citations: bool = True    # C4
    filter_javascript: bool = True   # C4
    filter_policy: bool = True       # C4
    filter_lorem_ipsum: bool = True  # C4
    filter_curly_bracket: bool = True  # C4 (FineWeb: removes 2.8% of tokens)

    def line_reason(self, line: str) -> str | None:
        ws = line.split()
        if any(len(w) > self.max_word_len for w in ws):
            return "long_word"
        if self.terminal_punct and (not line.endswith((".", "?", "!", '"', "'")) or line.endswith("...")):
            return "no_terminal_punct"
        if len(ws) < self.min_words_per_line:
            return "few_words"
        low = line.lower()
        if self.filter_javascript and "javascript" in low:
            return "javascript"
        if self.filter_policy and any(p in low for p in POLICY_PHRASES):
            return "policy"
        return None

    def modify(self, doc: Document, stats: StepStats) -> str:
        """The text with failing lines removed (their reasons counted in `stats.counters`)."""
        kept = []
        for line in doc.text.splitlines():
            line = line.strip()
            if self.remove_citations:
                line = _CITATION.sub("", line)
            if not line:
                continue
            reason = self.line_reason(line)
            if reason:
                stats.counters[f"lines_removed_{reason}"] += 1
            else:
                kept.append(line)
        return "\n".join(kept)

    def __call__(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        # Page-level reasons need their own names, so the line pass and page checks are inlined.
        for doc in docs:
            if self._bypass(doc, stats):
                yield doc
                continue
            stats.docs_in += 1
            stats.chars_in += len(doc.text)
            low = doc.text.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in low:
                stats.drop("c4_lorem_ipsum")
                continue
            if self.filter_curly_bracket and "{" in doc.text:
                stats.drop("c4_curly_bracket")
                continue
            text = self.modify(doc, stats)
            if not text:
                stats.drop("c4_no_lines_left")
                continue
            if count_sentences(text) < self.min_sentences:
                stats.drop("c4_few_sentences")
                continue
            if text != doc.text:
                stats.modified += 1
                doc.text = text
            stats.docs_out += 1
            stats.chars_out += len(text)
            yield doc


# ---- FineWeb (Penedo et al. 2024 §3.6; datatrove FineWebQualityFilter) ---------------------------

TERMINAL_PUNCTUATION = tuple(".!?;:\"'。！？؟۔।॥…‼⁇⁈⁉»”’")


@dataclass
class FineWebFilter(Filter):
    type: ClassVar[str] = "fineweb"
    name: str = "fineweb"
    min_line_punct_frac: float = 0.12   # FineWeb paper: drop if <= 0.12 (datatrove: < 0.12)
    max_dup_line_char_frac: float = 0.1  # FineWeb paper 0.1 (datatrove's code default is 0.01)
    short_line_len: int = 30            # FineWeb
    max_short_line_frac: float = 0.67   # FineWeb paper: drop if >= 0.67
    max_newline_word_ratio: float | None = None  # datatrove's extra list_ratio (0.3); off as in the paper

    def signals(self, text: str) -> dict[str, float]:
        lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
        if not lines:
            return {}
        _, dup_chars = find_duplicates(lines)
        return {
            "line_punct_frac": sum(ln.endswith(TERMINAL_PUNCTUATION) for ln in lines) / len(lines),
            "dup_line_char_frac": dup_chars / max(len(text.replace("\n", "")), 1),
            "short_line_frac": sum(len(ln) <= self.short_line_len for ln in lines) / len(lines),
            "newline_word_ratio": text.count("\n") / max(len(words(text)), 1),
        }

    def filter(self, doc: Document) -> tuple[bool, str | None]:
        s = self.signals(doc.text)
        if not s:
            return False, "fineweb_empty"
        if s["line_punct_frac"] <= self.min_line_punct_frac:
            return False, "fineweb_line_punct"
        if s["dup_line_char_frac"] >= self.max_dup_line_char_frac:
            return False, "fineweb_dup_line_chars"
        if s["short_line_frac"] >= self.max_short_line_frac:
            return False, "fineweb_short_lines"
        if self.max_newline_word_ratio is not None and s["newline_word_ratio"] > self.max_newline_word_ratio:
            return False, "fineweb_list_ratio"
        return True, None


# ---- dirty words (Llama 3 §3.1.1 after C4's LDNOOBW use) -----------------------------------------

_HYPHENATED = re.compile(r"\w+(?:-\w+)*")


def load_word_list(path: str | None) -> list[str]:
    if path is None:
        text = resources.files("herd.data").joinpath("assets/dirty_words_en.txt").read_text(encoding="utf-8")
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"dirty_words: word list {p} not found (one word or phrase per line)")
        text = p.read_text(encoding="utf-8")
    return [w.strip().lower() for w in text.splitlines() if w.strip() and not w.startswith("#")]


@dataclass
class DirtyWords(Filter):
    """Counts word-boundary matches of a word list (shipped: assets/dirty_words_en.txt, see
    assets/DIRTY_WORDS.md for its provenance). The default drops a page on any match, as C4 did;
    `max_fraction` (matches per word) is the softer "counting" rule."""

    type: ClassVar[str] = "dirty_words"
    name: str = "dirty_words"
    word_list: str | None = None
    max_count: int | None = 0          # C4: any match drops the page
    max_fraction: float | None = None  # e.g. 0.005: more than 1 match per 200 words

    @cached_property
    def _lists(self) -> tuple[frozenset[str], re.Pattern | None]:
        ws = load_word_list(self.word_list)
        single = frozenset(w for w in ws if " " not in w)
        phrases = sorted((w for w in ws if " " in w), key=len, reverse=True)
        pattern = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, phrases)) + r")(?!\w)") if phrases else None
        return single, pattern

    def count(self, text: str) -> int:
        """Word-boundary matches: single words by set lookup over the text's words (a hyphenated
        word also matches through its parts, as a `\b` regex would), phrases by regex."""
        single, phrases = self._lists
        low = text.lower()
        n = 0
        for w in _HYPHENATED.findall(low):
            if w in single:
                n += 1
            elif "-" in w:
                n += sum(p in single for p in w.split("-"))
        return n + (len(phrases.findall(low)) if phrases else 0)

    def filter(self, doc: Document) -> tuple[bool, str | None]:
        n = self.count(doc.text)
        doc.metadata["dirty_words"] = n
        if self.max_count is not None and n > self.max_count:
            return False, "dirty_words_count"
        if self.max_fraction is not None and n / max(len(words(doc.text)), 1) > self.max_fraction:
            return False, "dirty_words_fraction"
        return True, None


# ---- PII (datatrove PIIFormatter; dolma pii_regex) -----------------------------------------------

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")
# Candidates only (hex digits and at least two colons); ipaddress decides, so "12:30:45" stays.
IPV6 = re.compile(r"(?<![\w:])(?=[0-9A-Fa-f:]*:[0-9A-Fa-f]*:)[0-9A-Fa-f:]{2,39}(?![\w:])")


@dataclass
class PiiMask(Modifier):
    """Replaces e-mail addresses and *public* IP addresses (private, loopback and documentation
    ranges are not personal) with fixed placeholders; the placeholders are themselves not public
    addresses, so running the step twice changes nothing."""

    type: ClassVar[str] = "pii"
    name: str = "pii"
    email_replacement: str = "email@example.com"
    ip_replacement: str = "192.0.2.1"    # TEST-NET-1 (RFC 5737): never a real host
    max_matches: int | None = None       # dolma drops documents with > 5 PII matches; off by default

    def _ip(self, m: re.Match, stats: StepStats) -> str:
        try:
            addr = ipaddress.ip_address(m.group(0))
        except ValueError:  # 999.1.1.1, version strings like 1.2.3.4 that are fine, odd colons
            return m.group(0)
        if not addr.is_global:
            return m.group(0)
        stats.counters["ips_masked"] += 1
        return self.ip_replacement

    def _email(self, m: re.Match, stats: StepStats) -> str:
        if m.group(0) == self.email_replacement:
            return m.group(0)
        stats.counters["emails_masked"] += 1
        return self.email_replacement

    def modify(self, doc: Document, stats: StepStats) -> str:
        text = EMAIL.sub(lambda m: self._email(m, stats), doc.text)
        text = IPV4.sub(lambda m: self._ip(m, stats), text)
        return IPV6.sub(lambda m: self._ip(m, stats), text)

    def __call__(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        for doc in super().__call__(self._count(docs, stats), stats):
            yield doc

    def _count(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        if self.max_matches is None:
            yield from docs
            return
        for doc in docs:
            if self.where is not None and not matches(doc, self.where):
                yield doc
                continue
            n = len(EMAIL.findall(doc.text)) + sum(
                1 for m in IPV4.finditer(doc.text) if _is_global_ip(m.group(0)))
            if n > self.max_matches:
                stats.docs_in += 1
                stats.chars_in += len(doc.text)
                stats.drop("pii_too_many")
                continue
            yield doc


def _is_global_ip(s: str) -> bool:
    try:
        return ipaddress.ip_address(s).is_global
    except ValueError:
        return False


STEPS = (GopherRepetition, RepeatedLines, GopherQuality, C4Filter, FineWebFilter, DirtyWords, TokenKL, PiiMask)
