"""`herd tokenizer train`, `data tokenize`, `data run`, `data train-classifier`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from herd.cli.common import list_config_keys, print_config
from herd.io import refuse_existing


def cmd_tokenizer_train(opts) -> None:
    from herd.data.prepare import train_tokenizer_on_sources

    # Token shards record their tokenizer's sha256: replacing the file silently would orphan them.
    refuse_existing(opts.out, overwrite=opts.overwrite)
    r = train_tokenizer_on_sources(opts.sources, opts.out, vocab_size=opts.vocab_size, val_fraction=opts.val_fraction)
    print(f"trained {r.vocab_size:,} BPE tokens on {r.num_chars:,} characters in {r.seconds:.1f} s -> {r.path}")
    print(f"ids 0..{r.n_words - 1} ({r.vocab_size:,} + 256 special), sha256 {r.sha256[:16]}")
    if r.held_out_bytes_per_token is not None:
        print(f"held-out: {r.held_out_docs} docs, {r.held_out_bytes_per_token:.2f} bytes/token")


def cmd_data_tokenize(opts) -> None:
    from tqdm import tqdm

    from herd.data.prepare import tokenize_sources
    from herd.tokenizer import llama3_tokenizer_path

    bars: dict[str, tqdm] = {}

    def progress(split: str, n_docs: int, n_tokens: int) -> None:
        if split not in bars:
            bars[split] = tqdm(desc=split, unit=" docs", file=sys.stderr, disable=not sys.stderr.isatty())
        bar = bars[split]
        bar.update(n_docs - bar.n)
        bar.set_postfix_str(f"{n_tokens:,} tokens", refresh=False)

    try:
        for s in tokenize_sources(opts.sources, opts.out, tokenizer_path=opts.tokenizer or llama3_tokenizer_path(),
                                  val_fraction=opts.val_fraction, num_workers=opts.workers, bos=not opts.no_bos,
                                  eos=not opts.no_eos, resume=not opts.no_resume,
                                  max_tokens_per_shard=opts.max_tokens_per_shard, progress=progress):
            if s.split in bars:
                bars.pop(s.split).close()
            print(f"{s.split:>5}: {s.info.num_docs:,} docs, {s.info.num_tokens:,} tokens in {len(s.info.shards)} "
                  f"shard(s) -> {s.info.path} " + ("(already complete)" if s.already_complete else f"({s.seconds:.1f} s)"))
    finally:
        for bar in bars.values():
            bar.close()


class _FlagParser(argparse.ArgumentParser):
    def error(self, message):  # a one-line user error (exit status 2), not argparse's usage + exit
        raise ValueError(message)


def cmd_data_run(opts) -> None:
    from herd.data.pipeline import run_pipeline
    from herd.data.pipeline_config import load_pipeline

    # The flags may also follow the file, among the overrides that argparse left as they were.
    flags = _FlagParser(prog="herd data run", add_help=False, allow_abbrev=False)
    _data_run_flags(flags)
    late, overrides = flags.parse_known_args(opts.overrides)
    workers = late.workers if late.workers is not None else opts.workers
    if print_config(overrides, lambda rest: load_pipeline(opts.pipeline, rest).file):
        return
    cfg = load_pipeline(opts.pipeline, overrides)
    report = run_pipeline(cfg, workers=workers, fresh=opts.fresh or late.fresh)
    if opts.json or late.json:
        print(json.dumps(report.to_dict(), indent=1))
        return
    print(report.table())
    for name, out in report.outputs.items():
        tokens = f", {out['tokens']:,} tokens" if "tokens" in out else ""
        print(f"output {name}: {out.get('docs', 0):,} docs, {out.get('chars', 0) / 1e6:.2f} MB{tokens} -> {out['path']}")
    print(f"{report.seconds:.1f} s; report: {cfg.output_dir / 'report.json'}, {cfg.output_dir / 'report.html'}")


def cmd_data_train_classifier(opts) -> None:
    from herd.data.classifier_sources import labelled_examples, training_options
    from herd.data.pipeline import TrainSpec, train_classifier

    examples = labelled_examples(opts.example, limit=opts.limit)  # malformed --example first: it is cheaper to fix
    refuse_existing(opts.out, overwrite=opts.overwrite)
    spec = TrainSpec(model=opts.out, examples=examples, kind=opts.kind, chunk_chars=opts.chunk_chars,
                     options=training_options(opts.kind, epochs=opts.epochs))
    info = train_classifier(spec, Path(opts.out), log=lambda m: None)
    print(f"trained {opts.kind} classifier on {sum(info['examples_per_label'].values()):,} examples "
          f"({', '.join(f'{k} {v:,}' for k, v in info['examples_per_label'].items())}) in {info['seconds']} s")
    print(f"held-out accuracy {info['accuracy']:.3f} on {info['valid']:,} examples -> {opts.out} "
          f"(use it in a pipeline: [[step]] type = \"classify\", model = \"{opts.out}\")")


# ---- arguments -----------------------------------------------------------------------------------


def _sources_arg(p):
    p.add_argument("--sources", nargs="+", required=True, metavar="SOURCE",
                   help="wiki-en, wiki-fr, wiki-es, austen, python-stdlib, or JSONL files with a \"text\" field")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="share of documents held out by id hash (use the same value everywhere)")


def _tokenizer_train_args(p):
    _sources_arg(p)
    p.add_argument("--vocab-size", type=int, default=4096, help="base tokens incl. the 256 bytes")
    p.add_argument("--out", required=True, help="rank file to write, e.g. runs/tok/tokenizer.model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing rank file instead of stopping")


def _data_tokenize_args(p):
    _sources_arg(p)
    p.add_argument("--tokenizer", help="tiktoken rank file (default: the Llama 3 tokenizer)")
    p.add_argument("--out", required=True, help="writes OUT/train and OUT/val shard directories")
    p.add_argument("--workers", type=int, help="tokenizer processes (default: one per CPU core; 0: in-process)")
    p.add_argument("--max-tokens-per-shard", type=int, default=2**27, help="a new shard file starts after this many tokens")
    p.add_argument("--no-bos", action="store_true", help="do not start documents with <|begin_of_text|>")
    p.add_argument("--no-eos", action="store_true", help="do not end documents with <|end_of_text|>")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming an interrupted run")


def _data_run_flags(p):
    p.add_argument("--workers", type=int, help="processes (default: [pipeline] workers)")
    p.add_argument("--fresh", action="store_true", help="discard a previous run's work in output_dir instead of resuming")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")


def _data_run_args(p):
    p.add_argument("pipeline", help="pipeline TOML file (see herd/data/pipeline.py and configs/data/)")
    _data_run_flags(p)
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--section.key VALUE",
                   help="override file values, e.g. --pipeline.workers 4, a list entry's key by name or index: "
                   "--step.gopher_quality.min_words 40 --input.0.limit 100 (entries cannot be added, removed "
                   "or retyped; edit the file); --print-config prints the resolved file and exits")

    def config_class():
        from herd.data.pipeline_config import PipelineFile

        return PipelineFile

    list_config_keys(p, config_class)


def _data_train_classifier_args(p):
    from herd.data.classifier_sources import BUILTIN_SOURCES

    p.add_argument("--example", action="append", required=True, metavar="LABEL=SOURCE",
                   help="labelled examples: a JSONL / Parquet / WARC file, a folder of HTML, or one of "
                        + ", ".join(BUILTIN_SOURCES) + " (repeat, at least two labels)")
    p.add_argument("--out", required=True, help="model file to write (.bin for fastText, .pt for the transformer)")
    p.add_argument("--kind", choices=["fasttext", "transformer"], default="fasttext", help="the classifier's model")
    p.add_argument("--limit", type=int, help="examples per --example at most (long documents count per chunk)")
    p.add_argument("--chunk-chars", type=int, default=2000, help="long documents are cut into pieces of this size")
    p.add_argument("--epochs", type=int, default=10, help="passes over the examples")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model file instead of stopping")


COMMANDS = {
    "tokenizer train": (cmd_tokenizer_train, "train a small BPE vocabulary (tiktoken rank file)", _tokenizer_train_args),
    "data tokenize": (cmd_data_tokenize, "tokenize sources into train/val token shards", _data_tokenize_args),
    "data run": (cmd_data_run, "run a data-curation pipeline file (extract, dedup, filter, mix, shards)", _data_run_args),
    "data train-classifier": (cmd_data_train_classifier, "train a fastText or tiny-transformer quality/domain "
                              "classifier from labelled sources", _data_train_classifier_args),
}
