"""Per-core throughput of the curation pipeline's main steps on real pages.

    .venv/bin/python benchmarks/data_pipeline.py [--pages 300] [--repeat 3]

Runs every step in this one process (one core) over the same input: real Debian Administrator's
Handbook and Python docs HTML pages (fetched with apt-get download + dpkg -x into the cache, as the
demo pipeline does), extracted once for the text steps. Prints documents/s and MB/s per step next
to the figures the research note measured on this machine (shared/research/data-pipeline.md §4b;
their inputs were other pages, so compare orders of magnitude, not digits), and ends with one JSON
line. Each figure is the best of --repeat runs, because the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from herd.data.document import Document
from herd.data.steps.base import StepStats
from herd.data.steps.classifiers import Classify, train_fasttext
from herd.data.steps.dedup import LineDedup, MinHashDedup
from herd.data.steps.extract import Extract
from herd.data.steps.filters import (
    C4Filter,
    DirtyWords,
    FineWebFilter,
    GopherQuality,
    GopherRepetition,
    PiiMask,
    TokenKL,
)
from herd.data.steps.langid import LangId
from herd.data.steps.readers import DebianReader

# docs/s per core measured in the research note (§4b), where one exists.
NOTE = {"extract_resiliparse": 396, "extract_trafilatura": 25, "gopher_repetition": 170, "gopher_quality": 1180,
        "minhash_signature": 2561, "line_dedup_hashes": 1671, "langid_cld2": 2841, "langid_py3langid": 153,
        "classify_fasttext": 7700}


def pages(n: int) -> list[Document]:
    readers = [
        DebianReader(name="handbook", packages=["debian-handbook"], root="usr/share/doc/debian-handbook/html",
                     glob="*/*.html", url_template="https://debian-handbook.info/browse/{parent}/stable/{name}"),
        DebianReader(name="python_docs", packages=["python3-doc"], root="usr/share/doc/python3.11/html",
                     glob="**/*.html", url_template="https://docs.python.org/3.11/{relpath}"),
    ]
    units = [(r, u) for r in readers for u in r.units()]
    random.Random(0).shuffle(units)
    return [d for r, u in units[:n] for d in r.read(u)]


def copy(docs: list[Document]) -> list[Document]:
    return [Document(id=d.id, text=d.text, url=d.url, timestamp=d.timestamp, metadata=dict(d.metadata)) for d in docs]


def measure(name: str, fn, docs: list[Document], repeat: int) -> dict:
    best = float("inf")
    for _ in range(repeat):
        batch = copy(docs)
        t = time.perf_counter()
        fn(batch)
        best = min(best, time.perf_counter() - t)
    mb = sum(len(d.text.encode("utf-8")) for d in docs) / 1e6
    return {"step": name, "docs": len(docs), "docs_per_s": round(len(docs) / best, 1), "mb_per_s": round(mb / best, 2),
            "note_docs_per_s": NOTE.get(name)}


def run_step(step):
    def fn(batch):
        for _ in step(batch, StepStats(name=step.name, type=step.type)):
            pass
    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    html = pages(args.pages)
    texts = list(Extract(timeout_s=0)(copy(html), StepStats(name="e", type="extract")))
    for d in texts:
        d.metadata["language"] = "en"
    rows = [
        measure("extract_resiliparse", run_step(Extract(timeout_s=0)), html, args.repeat),
        measure("extract_resiliparse_sandboxed", run_step(Extract(timeout_s=5)), html, args.repeat),
        measure("extract_trafilatura", run_step(Extract(backend="trafilatura", timeout_s=0)), html[:60], 1),
        measure("langid_cld2", run_step(LangId()), texts, args.repeat),
        measure("langid_py3langid", run_step(LangId(backend="py3langid")), texts[:100], 1),
        measure("pii", run_step(PiiMask()), texts, args.repeat),
        measure("gopher_repetition", run_step(GopherRepetition()), texts, args.repeat),
        measure("gopher_quality", run_step(GopherQuality()), texts, args.repeat),
        measure("c4", run_step(C4Filter()), texts, args.repeat),
        measure("fineweb", run_step(FineWebFilter()), texts, args.repeat),
        measure("dirty_words", run_step(DirtyWords()), texts, args.repeat),
    ]
    mh = MinHashDedup()
    rows.append(measure("minhash_signature", lambda b: [mh.band_keys(d) for d in b], texts, args.repeat))
    ld = LineDedup()
    rows.append(measure("line_dedup_hashes", lambda b: [ld._hashes(d) for d in b], texts, args.repeat))
    with tempfile.TemporaryDirectory() as tmp:
        kl = TokenKL(reference="corpus")
        sig = Path(tmp) / "sig.json"
        for _ in kl.collect(copy(texts), sig):
            pass
        kl.plan([sig], Path(tmp))
        kl._load_reference(Path(tmp) / "reference.json")
        rows.append(measure("token_kl", lambda b: [kl.score(d.text) for d in b], texts, args.repeat))
        rng = random.Random(0)
        examples = [(d.text, "a" if rng.random() < 0.5 else "b") for d in texts]
        train_fasttext(examples, Path(tmp) / "m.bin", epoch=1)
        rows.append(measure("classify_fasttext", run_step(Classify(model=str(Path(tmp) / "m.bin"), field="q")),
                            texts, args.repeat))

    print(f"{'step':<32}{'docs':>6}{'docs/s':>10}{'MB/s':>8}{'note docs/s':>13}")
    for r in rows:
        note = f"{r['note_docs_per_s']:,}" if r["note_docs_per_s"] else "-"
        print(f"{r['step']:<32}{r['docs']:>6}{r['docs_per_s']:>10,.1f}{r['mb_per_s']:>8.2f}{note:>13}")
    html_kb = sum(len(d.text) for d in html) / len(html) / 1e3
    text_kb = sum(len(d.text) for d in texts) / len(texts) / 1e3
    print(f"inputs: {len(html)} HTML pages (mean {html_kb:.1f} KB), {len(texts)} extracted texts (mean {text_kb:.1f} KB); "
          f"one process, best of {args.repeat}", file=sys.stderr)
    print(json.dumps({"benchmark": "data_pipeline", "python": platform.python_version(), "pages": len(html),
                      "mean_html_kb": round(html_kb, 1), "mean_text_kb": round(text_kb, 1), "steps": rows}))


if __name__ == "__main__":
    main()
