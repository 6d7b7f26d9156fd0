"""herd against datatrove, per core, on the same extraction + filter + MinHash workload.

    .venv/bin/python benchmarks/data.py [--pages 600] [--rounds 3]

Needs `pip install 'herd[data,bench]'` (datatrove, spaCy for its English word splitting, its WARC
reader's cchardet/libmagic and orjson).

Input: real HTML pages (Debian Administrator's Handbook in its 26 locales and the Python 3.11 docs,
the pages benchmarks/data_pipeline.py loads) written once into a gzipped WARC with the headers a
Common Crawl WARC carries (`WARC-Identified-Payload-Type: text/html`, so datatrove's reader needs
no libmagic sniffing). Each framework then runs the whole job from that WARC in one worker process
(its own executor with one task / one shard), so documents/s per core = pages / wall seconds:

  read WARC -> extract (resiliparse, per-page time limit in a child process) -> Gopher repetition
  -> Gopher quality -> C4 -> FineWeb quality -> MinHash (word 5-grams, 14 buckets x 8 hashes):
  signatures, candidate pairs, clusters, removal -> JSONL (zstd) of the kept documents.

Same logical settings on both sides: resiliparse with the same arguments (datatrove has no
resiliparse extractor, so a `BaseExtractor` subclass calls it; herd's markdown stripping is turned
off since datatrove has no such step), the Gopher/C4 defaults (equal in both), FineWeb with the
paper's 0.1 duplicate-line-character threshold and no newline/word-ratio rule (herd's defaults;
datatrove's code defaults are 0.01 and 0.3). What stays different is each framework's own way:
datatrove splits words and sentences with spaCy's blank English tokenizer and hashes shingles
with xxhash + numpy permutations, herd splits on whitespace and uses rensa. Because spaCy is both
most of datatrove's time and the main cause of different kept counts (it makes punctuation marks
words), datatrove also runs a second time with a whitespace `WordTokenizer` (herd's words):
"datatrove_ws". The script prints the kept counts and every drop reason of each.

Rounds alternate which framework runs first, so load from other jobs on a shared machine hits
both; the figures are medians over rounds. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

# The herd beside this file (a checkout or worktree), not whichever one the venv has installed.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from data_pipeline import pages  # noqa: E402  (the same real pages as the per-step benchmark)

from herd.data.document import Document  # noqa: E402
from herd.data.pipeline import PipelineConfig, run_pipeline  # noqa: E402

TIMEOUT_S = 2.0  # per-page extraction limit, both sides


def write_warc(docs: list[Document], path: Path) -> None:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        for doc in docs:
            payload = doc.text.encode("utf-8")
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                               ("Content-Length", str(len(payload)))], protocol="HTTP/1.1")
            rec = w.create_warc_record(doc.url, "response", payload=io.BytesIO(payload), http_headers=http,
                                       warc_headers_dict={"WARC-Identified-Payload-Type": "text/html",
                                                          "WARC-Date": "2024-01-01T00:00:00Z"})
            w.write_record(rec)


def _count_jsonl(paths: list[Path]) -> int:
    import zstandard

    n = 0
    for p in paths:
        with open(p, "rb") as f:
            n += sum(1 for _ in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8"))
    return n


# ---- herd ----------------------------------------------------------------------------------------


def run_herd(warc: Path, work: Path) -> dict:
    cfg = PipelineConfig.from_dict({
        "pipeline": {"output_dir": str(work), "workers": 1, "shards": 1},
        "input": [{"type": "warc", "paths": [str(warc)]}],
        "step": [{"type": "extract", "backend": "resiliparse", "remove_markdown": False, "timeout_s": TIMEOUT_S},
                 {"type": "gopher_repetition"}, {"type": "gopher_quality"}, {"type": "c4"}, {"type": "fineweb"},
                 {"type": "minhash", "ngram": 5, "bands": 14, "rows": 8}],
        "output": [{"type": "jsonl", "path": "kept.jsonl.zst"}],
    })
    t = time.perf_counter()
    report = run_pipeline(cfg, fresh=True, log=lambda m: None)
    seconds = time.perf_counter() - t
    steps = {s.name: s for s in report.steps}
    return {"seconds": seconds, "read": steps["read"].docs_out, "kept": _count_jsonl([work / "kept.jsonl.zst"]),
            "dropped": {name: dict(s.dropped) for name, s in steps.items() if s.dropped},
            "step_seconds": {name: round(s.seconds, 2) for name, s in steps.items()}}


# ---- datatrove -----------------------------------------------------------------------------------


def _resiliparse_extractor():
    from datatrove.pipeline.extractors.base import BaseExtractor

    class Resiliparse(BaseExtractor):
        """datatrove's extension point for an extractor: `extract(html) -> text`, run by
        BaseExtractor in its per-page time-limit sandbox."""

        name = "resiliparse"

        def __init__(self, timeout: float) -> None:
            super().__init__(timeout)

        def extract(self, text: str) -> str:
            from resiliparse.extract.html2text import extract_plain_text

            return extract_plain_text(text, preserve_formatting=True, main_content=True, alt_texts=True,
                                      links=False, list_bullets=False)

    return Resiliparse(TIMEOUT_S)


def _whitespace_words():
    import re

    from datatrove.utils.word_tokenizers import WordTokenizer

    sentence_end = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")

    class WhitespaceWords(WordTokenizer):
        """herd's unit: whitespace words, and sentences ending at . ! ? before a space (a custom
        tokenizer is datatrove's documented alternative to the language's assigned one)."""

        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            ends = [m.end() for m in sentence_end.finditer(text)]
            if not ends or ends[-1] < len(text.rstrip()):
                ends.append(len(text))
            return list(zip([0] + ends[:-1], ends))

        def sent_tokenize(self, text: str) -> list[str]:
            return [s for a, b in self.span_tokenize(text) if (s := text[a:b].strip())]

    return WhitespaceWords("en")


def run_datatrove(warc: Path, work: Path, *, words: str = "spacy") -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.readers import JsonlReader, WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    mh = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    # "spacy": datatrove's assignment for English (spaCy's blank tokenizer); "whitespace": herd's.
    lang = "en" if words == "spacy" else _whitespace_words()
    filtered, sigs, buckets, remove, out, logs = (work / n for n in
                                                  ("filtered", "sigs", "buckets", "remove", "out", "logs"))
    t = time.perf_counter()
    # FineWeb's layout (datatrove examples/fineweb.py): the filtered documents are written once,
    # MinHash stages 1-3 find what to remove, stage 4 re-reads and filters them.
    stage1 = LocalPipelineExecutor(pipeline=[
        WarcReader(str(warc.parent), glob_pattern=warc.name),
        _resiliparse_extractor(),
        GopherRepetitionFilter(language=lang),
        GopherQualityFilter(language=lang),
        C4QualityFilter(language=lang),
        FineWebQualityFilter(char_duplicates_ratio=0.1, new_line_ratio=float("inf"), language=lang),
        JsonlWriter(str(filtered), compression="zstd"),
        MinhashDedupSignature(output_folder=str(sigs), config=mh, language=lang),
    ], tasks=1, workers=1, logging_dir=str(logs / "1"))
    stage2 = LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(str(sigs), str(buckets), config=mh)],
                                   tasks=mh.num_buckets, workers=1, logging_dir=str(logs / "2"))
    stage3 = LocalPipelineExecutor(pipeline=[MinhashDedupCluster(str(buckets), str(remove), config=mh)],
                                   tasks=1, workers=1, logging_dir=str(logs / "3"))
    stage4 = LocalPipelineExecutor(pipeline=[
        JsonlReader(str(filtered)),
        MinhashDedupFilter(str(remove)),
        JsonlWriter(str(out), compression="zstd"),
    ], tasks=1, workers=1, logging_dir=str(logs / "4"))
    # datatrove logs every task to stderr as well as to logging_dir; only the files are kept.
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), contextlib.redirect_stdout(null):
        for ex in (stage1, stage2, stage3, stage4):
            ex.run()
    seconds = time.perf_counter() - t
    stats = [json.loads((logs / k / "stats.json").read_text()) for k in ("1", "4")]
    dropped, read, step_seconds = {}, 0, {}
    for st in stats[0] + stats[1]:
        name, s = st["name"], st["stats"]
        step_seconds[name] = round(st["time_stats"]["total"], 2) if "time_stats" in st else None
        if "Warc" in name:
            read = s["documents"]["total"]
        d = {k.removeprefix("dropped_"): v for k, v in s.items() if k.startswith("dropped_")}
        if "dropped" in s and not d:
            d = {"dropped": s["dropped"]}
        if d:
            dropped[name] = d
    return {"seconds": seconds, "read": read, "kept": _count_jsonl(sorted(out.glob("*.jsonl.zst"))),
            "dropped": dropped, "step_seconds": step_seconds}


# ---- main ----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from loguru import logger

    logger.remove()  # datatrove's progress lines; its per-task log files are still written

    html = pages(args.pages)
    runners = {"herd": run_herd, "datatrove": run_datatrove,
               "datatrove_ws": partial(run_datatrove, words="whitespace")}
    with tempfile.TemporaryDirectory(prefix="herd-bench-data-") as tmp:
        warc = Path(tmp) / "input" / "pages.warc.gz"
        warc.parent.mkdir()
        write_warc(html, warc)
        # Warm-up (not timed): imports, spaCy's blank pipeline, first-call caches, page cache.
        for name, fn in runners.items():
            fn(warc, Path(tmp) / f"warm_{name}")
            shutil.rmtree(Path(tmp) / f"warm_{name}")
        results: dict[str, list[dict]] = {k: [] for k in runners}
        loads = []
        for r in range(args.rounds):
            order = list(runners) if r % 2 == 0 else list(runners)[::-1]
            for name in order:
                work = Path(tmp) / f"{name}_{r}"
                res = runners[name](warc, work)
                shutil.rmtree(work)
                results[name].append(res)
                loads.append(os.getloadavg()[0])
                print(f"round {r} {name:<10} {res['seconds']:7.2f} s  {args.pages / res['seconds']:7.1f} docs/s  "
                      f"kept {res['kept']}  (load {loads[-1]:.1f})", file=sys.stderr)

    med = {k: statistics.median(x["seconds"] for x in v) for k, v in results.items()}
    rate = {k: len(html) / s for k, s in med.items()}
    ratio = {k: rate["herd"] / rate[k] for k in runners if k != "herd"}
    print(f"\n{len(html)} pages, one worker process each, median of {args.rounds} rounds "
          f"(load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores)")
    print(f"{'':<14}{'seconds':>9}{'docs/s/core':>13}{'read':>7}{'kept':>7}")
    for k in runners:
        last = results[k][-1]
        print(f"{k:<14}{med[k]:>9.2f}{rate[k]:>13.1f}{last['read']:>7}{last['kept']:>7}")
    print(f"herd / datatrove: {ratio['datatrove']:.2f}x (target >= 1.5x); "
          f"herd / datatrove with whitespace words: {ratio['datatrove_ws']:.2f}x")
    for k in runners:
        print(f"{k} dropped: {json.dumps(results[k][-1]['dropped'], ensure_ascii=False)}")
        print(f"{k} step seconds (last round): {json.dumps(results[k][-1]['step_seconds'], ensure_ascii=False)}")
    print(json.dumps({
        "benchmark": "data", "python": platform.python_version(), "datatrove": _version("datatrove"),
        "pages": len(html), "rounds": args.rounds, "load_avg": [round(min(loads), 1), round(max(loads), 1)],
        "seconds": {k: [round(x["seconds"], 2) for x in v] for k, v in results.items()},
        "docs_per_s_per_core": {k: round(v, 1) for k, v in rate.items()},
        "ratio": {k: round(v, 2) for k, v in ratio.items()},
        "read": {k: v[-1]["read"] for k, v in results.items()}, "kept": {k: v[-1]["kept"] for k, v in results.items()},
    }))


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    main()
