"""Readers round-trip what the writers (and a WARC writer) produce; extraction and language ID."""

import gzip
import io
import json
import time

import pytest

from herd.data.document import Document
from herd.data.steps.base import StepStats
from herd.data.steps.extract import Extract, strip_markdown
from herd.data.steps.langid import LangId
from herd.data.steps.readers import FolderReader, JsonlReader, ParquetReader, WarcReader
from herd.data.steps.writers import JsonlOutput, ParquetOutput

PAGE = """<html><head><title>Energy</title><script>var x = "tracking";</script></head><body>
<nav><a href="/">Home</a> | <a href="/about">About us</a> | <a href="/contact">Contact</a></nav>
<main><h1>Mass and energy</h1>
<p>The famous relation between mass and energy is shown in the figure below, and it is one of the
best known results of twentieth century physics.</p>
<img src="e.png" alt="E = mc^2">
<p>It says that a small amount of mass corresponds to an enormous amount of energy.</p></main>
<footer>Copyright 2024 Example Corp. All rights reserved. Privacy policy.</footer></body></html>"""


def docs3():
    return [Document(id="a", text="first", url="https://x.org/a", timestamp="2023-01-02T03:04:05Z",
                     metadata={"language": "en", "score": 0.5, "tags": ["x"]}),
            Document(id="b", text="second\nline", metadata={"domain": "code"}),
            Document(id="c", text="été ünïcödé", url="https://x.org/c")]


def test_warc_reader_reads_html_responses_with_url_and_date(tmp_path):
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    path = tmp_path / "crawl.warc.gz"
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)

        def rec(url, body, ctype="text/html; charset=utf-8", status="200 OK", date="2023-05-06T07:08:09Z"):
            headers = StatusAndHeaders(status, [("Content-Type", ctype)], protocol="HTTP/1.1")
            w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers,
                                                warc_headers_dict={"WARC-Date": date}))

        rec("https://example.com/a", PAGE.encode())
        rec("https://example.com/logo.png", b"\x89PNG...", ctype="image/png")
        rec("https://example.com/missing", b"<html>404</html>", status="404 Not Found")
        rec("https://example.com/latin", "<p>caf\xe9 cr\xe8me</p>".encode("latin-1"), ctype="text/html; charset=iso-8859-1")
    r = WarcReader(paths=[str(tmp_path / "*.warc.gz")])
    out = [d for u in r.units() for d in r.read(u)]
    assert [d.url for d in out] == ["https://example.com/a", "https://example.com/latin"]
    assert out[0].timestamp == "2023-05-06T07:08:09Z" and out[0].metadata["format"] == "html"
    assert "alt=\"E = mc^2\"" in out[0].text and "café crème" in out[1].text


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_round_trip_keeps_all_fields(tmp_path, suffix):
    out = JsonlOutput(path=f"docs{suffix}", name="j")
    info = out.write(docs3(), out_dir=tmp_path, workers=1)
    assert info["docs"] == 3
    r = JsonlReader(paths=[str(tmp_path / f"docs{suffix}")])
    back = [d for u in r.units() for d in r.read(u)]
    for a, b in zip(docs3(), back):
        assert (b.id, b.text, b.url, b.timestamp) == (a.id, a.text, a.url, a.timestamp)
        assert b.metadata == {**a.metadata, "source": "jsonl"}


def test_jsonl_reader_maps_foreign_field_names(tmp_path):
    p = tmp_path / "x.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write(json.dumps({"content": "hello", "doc_id": 7, "lang": "en"}) + "\n")
    [d] = JsonlReader(paths=[str(p)], text_key="content", id_key="doc_id").read(str(p))
    assert (d.id, d.text, d.metadata["lang"]) == ("7", "hello", "en")
    with pytest.raises(ValueError, match="text_key"):
        list(JsonlReader(paths=[str(p)]).read(str(p)))


def test_parquet_round_trip(tmp_path):
    ParquetOutput(path="docs.parquet", name="p", row_group_size=2).write(docs3(), out_dir=tmp_path, workers=1)
    r = ParquetReader(paths=[str(tmp_path / "docs.parquet")])
    back = [d for u in r.units() for d in r.read(u)]
    assert [(d.id, d.text, d.url) for d in back] == [(d.id, d.text, d.url) for d in docs3()]
    assert back[0].metadata["tags"] == ["x"] and back[0].metadata["score"] == 0.5


def test_output_selection_writes_an_annealing_subset(tmp_path):
    docs = [Document(id=str(i), text="t", metadata={"domain": d, "quality": q})
            for i, (d, q) in enumerate([("code", 0.9), ("code", 0.2), ("math", 0.95), ("general", 0.99)])]
    info = JsonlOutput(path="anneal.jsonl", name="anneal", where={"domain": ["code", "math"]},
                       min={"quality": 0.8}).write(docs, out_dir=tmp_path, workers=1)
    assert info["docs"] == 2
    assert [json.loads(x)["id"] for x in (tmp_path / "anneal.jsonl").read_text().splitlines()] == ["0", "2"]


def test_folder_reader_builds_urls_from_the_path(tmp_path):
    (tmp_path / "en-US").mkdir()
    (tmp_path / "en-US" / "apt.html").write_text(PAGE)
    r = FolderReader(root=str(tmp_path), glob="*/*.html", url_template="https://h.info/{parent}/stable/{name}")
    [d] = [d for u in r.units() for d in r.read(u)]
    assert d.url == "https://h.info/en-US/stable/apt.html" and d.timestamp.endswith("Z")
    with pytest.raises(FileNotFoundError, match="nothing matches"):
        FolderReader(root=str(tmp_path), glob="*.txt").units()


# ---- extraction ----------------------------------------------------------------------------------


def extract(step, texts):
    stats = StepStats(name="extract", type="extract")
    out = list(step([Document(id=str(i), text=t, metadata={"format": "html"}) for i, t in enumerate(texts)], stats))
    stats.check()
    return out, stats


@pytest.mark.parametrize("backend", ["resiliparse", "trafilatura"])
def test_extraction_keeps_alt_text_and_drops_boilerplate(backend):
    [d], _ = extract(Extract(backend=backend, timeout_s=0), [PAGE])
    assert "E = mc^2" in d.text
    assert "famous relation between mass and energy" in d.text
    for junk in ("Home", "About us", "Copyright", "tracking", "![", "](", "#"):
        assert junk not in d.text, junk
    assert d.metadata["format"] == "text"


def test_markdown_markers_are_removed_and_content_kept():
    md = "# Title\n\nSome **bold**, *italic* and `code`; keep snake_case_name.\n\n- item [link](http://x)\n> quote\n"
    assert strip_markdown(md) == "Title\n\nSome bold, italic and code; keep snake_case_name.\n\nitem link\nquote"


def _slow_on_marker(html):
    if "STALL" in html:
        time.sleep(30)
    return "text of " + html


def test_extraction_time_limit_drops_a_stalling_page_and_goes_on():
    step = Extract(extractor=_slow_on_marker, timeout_s=0.5)
    t = time.perf_counter()
    out, stats = extract(step, ["<p>one</p>", "<p>STALL</p>", "<p>three</p>"])
    assert time.perf_counter() - t < 10
    assert [d.id for d in out] == ["0", "2"] and out[1].text == "text of <p>three</p>"
    assert stats.dropped == {"extract_timeout": 1}


# ---- language ID ---------------------------------------------------------------------------------

SHORT = {"en": "Where is the train station?", "fr": "Où se trouve la gare, s'il vous plaît ?",
         "es": "¿Dónde está la estación de tren?", "de": "Wo ist der Bahnhof, bitte?"}


@pytest.mark.parametrize("backend", ["cld2", "py3langid"])
def test_langid_on_short_texts(backend):
    lid = LangId(backend=backend)
    for lang, text in SHORT.items():
        assert lid.predict(text)[0] == lang, (backend, text)


def test_langid_keeps_only_requested_languages_and_counts_them():
    stats = StepStats(name="langid", type="langid")
    docs = [Document(id=k, text=v) for k, v in SHORT.items()]
    out = list(LangId(languages=["en", "de"])(docs, stats))
    stats.check()
    assert [d.id for d in out] == ["en", "de"] and out[0].metadata["language"] == "en"
    assert stats.dropped == {"language_not_kept": 2}
    assert stats.counters == {"lang_en": 1, "lang_fr": 1, "lang_es": 1, "lang_de": 1}
    with pytest.raises(ValueError, match="model_path"):
        LangId(backend="fasttext")


def test_wikipedia_topics_come_with_each_lead():
    from herd.data.corpora import _wiki_file, wikipedia_leads
    from herd.data.steps.readers import WikipediaReader

    with open(_wiki_file("en"), encoding="utf-8") as f:
        raw = json.load(f)
    maths = {f"wiki-en/{t}" for t, a in raw.items() if a.get("topic") == "Mathematics" and (a.get("extract") or "").strip()}
    assert 100 < len(maths) < 1000
    assert {d.id for d in wikipedia_leads("en") if d.topic == "Mathematics"} == maths
    r = WikipediaReader(languages=["en"], topics=["Mathematics"])
    docs = [d for u in r.units() for d in r.read(u)]
    assert {d.id for d in docs} == maths and {d.metadata["topic"] for d in docs} == {"Mathematics"}
    r = WikipediaReader(languages=["en"], exclude_topics=["Mathematics"], limit=50)
    docs = [d for u in r.units() for d in r.read(u)]
    assert len(docs) == 50 and not maths & {d.id for d in docs}
    assert all(d.metadata["topic"] == raw[d.id.split("/", 1)[1]].get("topic", "") for d in docs)


def test_langid_where_passes_other_documents_unlabelled():
    stats = StepStats(name="langid", type="langid")
    docs = [Document(id=k, text=v, metadata={"source": "web"}) for k, v in SHORT.items()]
    docs.append(Document(id="code", text="for i in range(10):\n    print(i)", metadata={"source": "code"}))
    out = list(LangId(languages=["en"], where={"source": ["web"]})(docs, stats))
    stats.check()
    assert [d.id for d in out] == ["en", "code"] and "language" not in out[1].metadata
    assert stats.dropped == {"language_not_kept": 3} and stats.counters["not_applied"] == 1


def test_folder_reader_globs_in_the_order_given(tmp_path):
    for loc in ("de-DE", "en-US", "fr-FR"):
        (tmp_path / loc).mkdir()
        for name in ("b.html", "a.html"):
            (tmp_path / loc / name).write_text(PAGE)
    r = FolderReader(root=str(tmp_path), glob=["fr-FR/*.html", "en-US/*.html", "*/a.html"])
    assert [u.split("/")[-2] + "/" + u.split("/")[-1] for u in r.units()] == [
        "fr-FR/a.html", "fr-FR/b.html", "en-US/a.html", "en-US/b.html", "de-DE/a.html"]
    with pytest.raises(FileNotFoundError, match="it-IT"):
        FolderReader(root=str(tmp_path), glob=["en-US/*.html", "it-IT/*.html"]).units()

