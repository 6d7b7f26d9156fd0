"""The speedrun's data stage (herd.data.speedrun, configs/data/speedrun.toml): a quick run on the
real sources, and the same steps on a crawl built here with planted duplicates and a French page.
Both need the Debian packages (debian-handbook, r-cran-janeaustenr), fetched once into herd's cache;
they are skipped where apt cannot fetch them."""

import itertools
from pathlib import Path

import pytest

from herd.data.corpora import python_stdlib_sources, wikipedia_leads
from herd.data.debian import write_warc
from herd.data.document import Document
from herd.data.speedrun import SOURCES, curate, run_curation, speedrun_config


def _curate_or_skip(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except FileNotFoundError as e:  # no apt-get, no apt lists, no network: the packages cannot be had
        pytest.skip(f"Debian package unavailable: {e}")


def _check_counts_add_up(cur):
    steps = [s for s in cur.steps if s.type != "read"]
    assert [s.name for s in cur.steps if s.type == "read"] == ["read"]
    assert steps[0].docs_in == sum(cur.read.values())
    for prev, s in zip(steps, steps[1:]):
        assert s.docs_in == prev.docs_out, s.name  # nothing appears or vanishes between steps
    for s in steps:
        assert s.docs_in + s.docs_added == s.docs_out + s.num_dropped, s.name
    assert steps[-1].docs_out == sum(cur.kept.values())


def test_quick_curate_on_the_real_sources(tmp_path, monkeypatch):
    logs: list[str] = []
    cur = _curate_or_skip(curate, tmp_path, quick=True, log=logs.append)
    assert not cur.reused and set(cur.sources) == set(SOURCES)
    _check_counts_add_up(cur)
    docs = {name: list(fn()) for name, fn in cur.sources.items()}
    assert {n: len(d) for n, d in docs.items()} == cur.kept and all(cur.kept.values())
    assert {n: c for n, c in cur.read.items() if n != "web"} == {"wiki": 300, "austen": 40, "code": 20}
    assert cur.read["web"] > 200  # two locales of the handbook (127 pages each in Debian 12)
    # Code passes every prose rule untouched; only exact copies go (two stdlib files are identical).
    code = [d.text for d in python_stdlib_sources(limit=20)]
    assert sorted(d.text for d in docs["code"]) == sorted(set(code))
    # Wikipedia leads are never rewritten, and keep their ids (the validation split hashes them).
    leads = {d.id: d for d in itertools.islice(wikipedia_leads("en"), 300)}
    assert all(leads[d.id].text == d.text and leads[d.id].topic == d.topic for d in docs["wiki"])
    assert all(d.id.startswith("https://debian-handbook.info/browse/") for d in docs["web"])
    table = "\n".join(logs)
    for step in ("url_dedup", "extract", "langid", "exact_dedup", "minhash", "line_dedup", "gopher_quality", "mix"):
        assert f"\n{step} " in table
    # A second call finds the finished run and reads nothing again: the pipeline must not run
    # (checked by refusing it, not by a wall-clock bound that a loaded machine could break).
    def no_rerun(*a, **k):
        raise AssertionError("a finished curation ran its pipeline again")

    monkeypatch.setattr("herd.data.speedrun.run_pipeline", no_rerun)
    again = curate(tmp_path, quick=True, log=lambda m: None)
    assert again.reused and again.kept == cur.kept


def _page(title: str, paragraphs: list[str]) -> str:
    body = "".join(f"<p>{p}</p>\n" for p in paragraphs)
    return (f"<html><head><title>{title}</title></head><body><nav><a href='/'>Home</a> | <a href='/a'>About</a>"
            f"</nav><main><h1>{title}</h1>\n{body}</main><footer>Example wiki mirror</footer></body></html>")


def test_speedrun_steps_remove_planted_duplicates_and_other_languages(tmp_path):
    # Pages of three real English leads each (from beyond the first 300, which the wiki input reads).
    long_en = [d.text for d in itertools.islice(wikipedia_leads("en"), 3000, None) if 80 < len(d.text.split()) < 200]
    fr = [d.text for d in wikipedia_leads("fr") if 80 < len(d.text.split()) < 200][:3]
    page = lambda k: _page(f"Page {k}", long_en[3 * k: 3 * k + 3])  # noqa: E731
    words = long_en[3].split()
    words[20], words[60] = "indeed", "notably"  # a near-duplicate of page 1: 2 words of ~300 changed
    near = _page("Page 1", [" ".join(words)] + long_en[4:6])
    crawl = [("https://ex.org/p0", page(0), "2024-03-01T00:00:00Z"),
             ("https://mirror.ex.org/p0", page(0), "2024-03-01T00:00:00Z"),   # exact copy, other URL
             ("https://ex.org/p1", page(1), "2024-03-01T00:00:00Z"),
             ("https://ex.org/p1-old", near, "2024-03-01T00:00:00Z"),          # near-duplicate
             ("https://ex.org/p2", page(5), "2023-01-01T00:00:00Z"),          # older crawl of p2
             ("https://ex.org/p2", page(2), "2024-03-01T00:00:00Z"),
             ("https://ex.org/fr", _page("Page fr", fr), "2024-03-01T00:00:00Z"),  # French
             ("https://ex.org/p3", page(3), "2024-03-01T00:00:00Z")]
    warc = write_warc((Document(id=str(i), text=h, url=u, timestamp=t) for i, (u, h, t) in enumerate(crawl)),
                      tmp_path / "crawl.warc.gz")
    config = speedrun_config(tmp_path, quick=True)
    config["input"] = [{"type": "warc", "name": "web", "paths": [str(warc)]}] + [
        i for i in config["input"] if i["name"] != "web"]
    cur = _curate_or_skip(run_curation, config, log=lambda m: None)
    _check_counts_add_up(cur)
    stats = {s.name: s for s in cur.steps}
    kept = [d.id for d in cur.sources["web"]()]
    assert stats["url_dedup"].dropped == {"url_duplicate_older": 1}
    assert "https://mirror.ex.org/p0" not in kept and stats["exact_dedup"].dropped["exact_duplicate"] >= 1
    assert len({"https://ex.org/p1", "https://ex.org/p1-old"} & set(kept)) == 1
    assert stats["minhash"].dropped["minhash_duplicate"] >= 1
    assert "https://ex.org/fr" not in kept and stats["langid"].dropped["language_not_kept"] >= 1
    assert sorted(set(kept) - {"https://ex.org/p1-old", "https://ex.org/p1"}) == [
        "https://ex.org/p0", "https://ex.org/p2", "https://ex.org/p3"]
    # The newer crawl of p2 is the one kept.
    [p2] = [d for d in cur.sources["web"]() if d.id == "https://ex.org/p2"]
    assert long_en[6][:60] in p2.text and long_en[15][:60] not in p2.text
    assert Path(cur.output_dir, "report.json").is_file()


def test_run_curation_reuses_a_finished_run_and_restarts_an_edited_one(tmp_path):
    from herd.data.steps.writers import write_jsonl

    texts = ["The cat sat on the mat.", "The cat sat on the mat.", "A different sentence entirely."]
    write_jsonl([Document(id=f"n{i}", text=t) for i, t in enumerate(texts)], tmp_path / "notes.jsonl")
    config = {"pipeline": {"output_dir": str(tmp_path / "run"), "workers": 1},
              "input": [{"type": "jsonl", "name": "notes", "paths": [str(tmp_path / "notes.jsonl")]}],
              "step": [{"type": "exact_dedup"}],
              "output": [{"type": "jsonl", "name": "notes", "path": "notes.jsonl"}]}
    first = run_curation(config, log=lambda m: None)
    assert not first.reused and first.kept == {"notes": 2} and first.read == {"notes": 3}
    assert [d.source for d in first.sources["notes"]()] == ["notes", "notes"]
    assert run_curation(config, log=lambda m: None).reused
    config["step"] = []
    logs: list[str] = []
    edited = run_curation(config, log=logs.append)
    assert not edited.reused and edited.kept == {"notes": 3} and any("starting over" in m for m in logs)
    config["output"][0]["name"] = "other"
    with pytest.raises(ValueError, match="jsonl output of the same name"):
        run_curation(config, log=lambda m: None)
