"""On real pages from Debian packages (fetched once into ~/.cache/herd/debian with apt-get download +
dpkg -x; skipped where there is no apt): MinHash finds the handbook's untranslated "translations"
and keeps the translated ones; line dedup strips the Python docs' navigation and keeps the text."""

import shutil

import pytest

from herd.data.document import Document
from herd.data.steps.base import StepStats
from herd.data.steps.dedup import LineDedup, MinHashDedup
from herd.data.steps.extract import Extract
from herd.data.steps.readers import DebianReader

pytestmark = pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get to fetch Debian packages")

PAGES = ["advanced-administration", "apt", "basic-configuration", "case-study", "derivative-distributions",
         "existing-setup", "index", "installation", "network-infrastructure"]


def fetched_root(reader):
    try:
        return reader._root()
    except FileNotFoundError as e:  # no apt lists on this machine (apt-get update never ran), no network
        pytest.skip(f"Debian package unavailable: {e}")


def extracted(reader, paths, **kw):
    docs = [d for p in paths for d in reader.read(str(p))]
    return list(Extract(timeout_s=0, **kw)(docs, StepStats(name="e", type="extract")))


def test_minhash_on_handbook_translations(tmp_path, run_steps):
    r = DebianReader(name="handbook", packages=["debian-handbook"], root="usr/share/doc/debian-handbook/html",
                     glob="*/*.html")
    root = fetched_root(r)
    # da-DK pages are ~95% untranslated English (near-duplicates of en-US); fr-FR pages are translated.
    docs = extracted(r, [root / loc / f"{p}.html" for loc in ("en-US", "da-DK", "fr-FR") for p in PAGES])
    out, stats = run_steps(tmp_path, docs, [MinHashDedup()])
    kept = {d.id.split("/")[1] for d in out}
    assert kept == {"en-US", "fr-FR"}
    assert stats["minhash"].dropped == {"minhash_duplicate": len(PAGES)}


def test_line_dedup_strips_python_docs_navigation(tmp_path, run_steps):
    r = DebianReader(name="python_docs", packages=["python3-doc"], root="usr/share/doc/python3.11/html",
                     glob="library/*.html")
    fetched_root(r)
    units = r.units()[:40]
    # main_content=False keeps the Sphinx navigation, as a naive extractor would.
    docs = [Document(id=d.id, text=d.text, metadata=d.metadata) for d in extracted(r, units, main_content=False)]
    assert all("Navigation" in d.text for d in docs)
    out, stats = run_steps(tmp_path, docs, [LineDedup()])
    assert len(out) == len(docs)
    for before, after in zip(docs, out):
        assert "Navigation" not in after.text and "Python Software Foundation" not in after.text
        assert len(after.text) > 0.5 * len(before.text)  # the module's documentation stays
    assert stats["line_dedup"].counters["lines_removed"] > 20 * len(docs)
