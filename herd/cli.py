"""`herd <command>`: parse arguments, call the library, print. No logic of its own.

Each command is one small function taking the parsed namespace; COMMANDS maps names to
(function, help, argument builder). Library errors meant for users (ValueError,
FileNotFoundError) are printed as one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def _dtype(name: str | None):
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16")
    return getattr(torch, DTYPES[name])


def _load(opts):
    """The checkpoint at opts.path (directory or .gguf) with its tokenizer and chat format."""
    from herd.generate.loading import load_for_inference

    return load_for_inference(opts.path, tokenizer=opts.tokenizer, dtype=_dtype(opts.dtype), device=opts.device,
                              max_seq_len=opts.max_seq_len)


def _sampling(opts):
    from herd.generate import SamplingParams

    return SamplingParams(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k, seed=opts.seed)


# ---- commands ------------------------------------------------------------------------------


def cmd_info(opts) -> None:
    from herd.model.formats import describe

    info = describe(opts.path)
    a = info.args
    if opts.json:
        print(json.dumps({"path": str(info.path), "format": info.format, "dtype": info.dtype,
                          "num_params": info.num_params, "bytes_on_disk": info.bytes_on_disk,
                          "files": list(info.files), "config": info.config}, indent=2))
        return
    scaling = "none" if a.rope_scaling is None else (
        f"llama3 factor {a.rope_scaling.factor:g} (low {a.rope_scaling.low_freq_factor:g}, "
        f"high {a.rope_scaling.high_freq_factor:g}, original {a.rope_scaling.original_max_seq_len})")
    rows = [
        ("path", str(info.path)),
        ("format", {"hf": "Hugging Face safetensors", "meta": "Meta consolidated.*.pth",
                    "gguf": "GGUF (llama.cpp)"}[info.format]),
        ("files", ", ".join(info.files)),
        ("dtype", info.dtype),
        ("parameters", f"{info.num_params:,} ({info.num_params / 1e9:.3f} B)"),
        ("size on disk", f"{info.bytes_on_disk / 2**20:,.1f} MiB"),
        ("layers / dim", f"{a.n_layers} / {a.dim}"),
        ("heads (q / kv)", f"{a.n_heads} / {a.n_kv_heads}, head_dim {a.head_dim}"),
        ("ffn hidden", str(a.ffn_hidden_dim)),
        ("vocabulary", f"{a.vocab_size:,}"),
        ("rope", f"theta {a.rope_theta:g}, scaling {scaling}"),
        ("context", f"{a.max_seq_len:,} tokens"),
        ("tied embeddings", "yes" if a.tie_embeddings else "no"),
        ("KV cache", f"{a.kv_cache_bytes_per_token() / 1024:g} KiB/token in bf16"),
    ]
    for k, v in rows:
        print(f"{k:>16}  {v}")


def cmd_generate(opts) -> None:
    from herd.generate import stream_text
    from herd.tokenizer import Message

    lm = _load(opts)
    model, tok = lm.model, lm.tokenizer
    if opts.chat:
        if len(opts.prompt) > 1:
            raise ValueError("--chat takes one --prompt (one user turn); use `herd chat` for a conversation")
        messages = ([Message(role="system", content=opts.system)] if opts.system else []) + [
            Message(role="user", content=opts.prompt[0])]
        prompts = [lm.chat.encode_dialog_prompt(messages).tokens]
    else:
        prompts = [lm.encode_text(p) for p in opts.prompt]
    stop = lm.stop_tokens if not opts.ignore_eos else ()
    events = stream_text(model, tok, prompts, max_new_tokens=opts.max_new_tokens, sampling=_sampling(opts),
                         stop_tokens=stop, logprobs=opts.logprobs)
    if len(prompts) == 1:  # stream a single prompt as it is produced
        print(opts.prompt[0] if not opts.chat else "", end="", flush=True)
    while True:
        try:
            event = next(events)
        except StopIteration as done:
            results = done.value
            break
        if len(prompts) == 1 and event.texts[0]:
            print(event.texts[0], end="", flush=True)
    if len(prompts) == 1:
        print()
    else:
        for p, r in zip(opts.prompt, results):
            print(f"--- {p!r}\n{p}{tok.decode(r.tokens)}")
    for r in results:
        line = f"[{len(r.tokens)} tokens, finish: {r.finish_reason}]"
        if opts.logprobs and r.logprobs:
            line += " logprobs: " + " ".join(f"{tok.decode([t])!r}:{lp:.3f}" for t, lp in zip(r.tokens, r.logprobs))
        print(line, file=sys.stderr)


def cmd_chat(opts) -> None:
    from herd.generate.session import ChatSession

    lm = _load(opts)
    session = ChatSession(lm.model, lm.tokenizer, chat=lm.chat, system=opts.system, sampling=_sampling(opts),
                          max_new_tokens=opts.max_new_tokens)
    print("herd chat: type a message; /reset clears the history; Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if not line.strip():
            continue
        if line.strip() == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        print("llama> ", end="", flush=True)
        try:
            for piece in session.send(line):
                print(piece, end="", flush=True)
        except ValueError as e:
            print(f"\n(error: {e})", file=sys.stderr)
            continue
        print()
        if session.last_reply and session.last_reply.tool_calls:
            for call in session.last_reply.tool_calls:
                print(f"(tool call: {call.name}({json.dumps(call.arguments)}))", file=sys.stderr)


def cmd_tokenize(opts) -> None:
    from herd.tokenizer import llama3_tokenizer_path, tokenizer_from_path

    tok = tokenizer_from_path(opts.tokenizer or llama3_tokenizer_path())
    if opts.decode is not None:
        ids = [int(t) for t in opts.decode.replace(",", " ").split()]
        print(tok.decode(ids))
        return
    if opts.file:
        text = Path(opts.file).read_text(encoding="utf-8")
    elif opts.text is not None:
        text = opts.text
    else:
        text = sys.stdin.read()
    ids = tok.encode(text, bos=opts.bos, eos=opts.eos, allowed_special="all" if opts.allow_special else frozenset())
    if opts.count:
        print(f"{len(ids)} tokens, {len(text)} characters, {len(text) / max(len(ids), 1):.2f} characters/token")
    elif opts.pieces:
        print(" ".join(f"{i}:{tok.decode([i])!r}" for i in ids))
    else:
        print(" ".join(map(str, ids)))


def cmd_convert(opts) -> None:
    from herd.train.export import convert_checkpoint

    out = convert_checkpoint(opts.src, opts.dst, to=opts.to, qtype=opts.qtype, num_shards=opts.num_shards,
                             overwrite=opts.overwrite)
    print(f"wrote {opts.to if opts.to != 'gguf' else 'GGUF ' + opts.qtype} checkpoint to {out}")


def cmd_demo(opts) -> None:
    from herd.demo import run_demo

    run_demo(out_dir=Path(opts.out), quick=opts.quick)


def cmd_plan(opts) -> None:
    from herd.model import ModelArgs
    from herd.parallel.plan import Layout, format_plan, parse_count, plan

    layout = Layout(gpus=opts.gpus, tp=opts.tp, cp=opts.cp, pp=opts.pp, seq_len=opts.seq,
                    global_batch_tokens=parse_count(opts.gbs_tokens), micro_batch=opts.micro_batch, ac=opts.ac,
                    pp_schedule=opts.pp_schedule)
    p = plan(ModelArgs.from_name(opts.model), layout, model=opts.model)
    if opts.json:
        print(json.dumps(p.to_dict(), indent=2))
        return
    print(format_plan(p, mfu=opts.mfu, peak_flops=opts.peak_tflops * 1e12, gpu_memory_gib=opts.gpu_memory_gib))


def cmd_quantize(opts) -> None:
    from herd.quant import QuantConfig, quantize_checkpoint

    from herd.tokenizer.files import gguf_tokenizer_files

    config = QuantConfig(opts.scheme, group_size=opts.group_size, activations=opts.activations, head=opts.head)
    extra = gguf_tokenizer_files(opts.path) if opts.path.endswith(".gguf") else None  # a directory's are copied
    report = quantize_checkpoint(opts.path, opts.out, config, overwrite=opts.overwrite, extra_files=extra)
    print(f"quantized {len(report.modules)} linear layers to {report.scheme} (output head: {report.head}): "
          f"{report.bytes_before / 2**20:,.1f} MiB -> {report.bytes_after / 2**20:,.1f} MiB; wrote {opts.out}")


def cmd_eval_perplexity(opts) -> None:
    from herd.eval.perplexity import compare_schemes, held_out_wiki_text

    if opts.text:
        text, source = Path(opts.text).read_text(encoding="utf-8"), opts.text
    else:
        text, n_docs = held_out_wiki_text(opts.wiki, val_fraction=opts.val_fraction)
        source = f"wikipedia-{opts.wiki}, {n_docs} held-out articles (val_fraction {opts.val_fraction})"
    rows = compare_schemes(opts.path, text, schemes=opts.schemes, seq_len=opts.seq_len, stride=opts.stride,
                           max_tokens=opts.max_tokens, group_size=opts.group_size, tokenizer_path=opts.tokenizer)
    first = rows[0].result
    if opts.json:
        print(json.dumps({"text": source, "seq_len": opts.seq_len, "stride": opts.stride or opts.seq_len,
                          "rows": [{"scheme": r.scheme, **dataclasses.asdict(r.result),
                                    "delta_perplexity": r.delta_perplexity} for r in rows]}))
        return
    print(f"text: {source}; {first.num_tokens:,} tokens scored, {first.num_bytes:,} bytes; "
          f"seq_len {opts.seq_len}, stride {opts.stride or opts.seq_len}")
    print(f"{'scheme':<12}{'perplexity':>12}{'bits/byte':>11}{'change':>10}")
    for r in rows:
        change = "" if r.delta_perplexity is None else f"{100 * r.delta_perplexity:+.2f}%"
        print(f"{r.scheme:<12}{r.result.perplexity:>12.3f}{r.result.bits_per_byte:>11.4f}{change:>10}")


def cmd_train(opts) -> None:
    from herd.parallel.launch import is_rank0, pop_nproc, run_under_torchrun
    from herd.train import Trainer, load_config

    nproc, overrides = pop_nproc(opts.overrides)
    if nproc > 1:  # the same command under torchrun: one code path for both spellings
        code = run_under_torchrun(nproc, ["train", opts.config, *overrides])
        if code:
            raise SystemExit(code)
        return
    result = Trainer(load_config(opts.config, overrides)).fit()
    if not is_rank0():
        return
    for s in result.stages:
        line = f"{s.name}: {s.steps} steps, {s.tokens:,} tokens in {s.seconds:.1f} s -> {s.checkpoint}"
        if s.val_loss is not None:
            line += f" (val loss {s.val_loss:.4f})"
        if s.averaged:
            line += f"; averaged model {s.averaged}"
        print(line)
    print(f"done: {result.steps} steps, {result.tokens_seen:,} tokens"
          + (f"; loss plot {result.loss_plot}" if result.loss_plot else ""))


def cmd_export(opts) -> None:
    from herd.train import export_checkpoint

    out = export_checkpoint(opts.checkpoint, opts.out, format=opts.format, tokenizer=opts.tokenizer,
                            overwrite=opts.overwrite)
    print(f"wrote {opts.format} checkpoint to {out}")


def cmd_tokenizer_train(opts) -> None:
    import time

    from herd.data.corpora import read_sources
    from herd.data.split import select_split
    from herd.tokenizer import Tokenizer
    from herd.tokenizer.train_bpe import train_tokenizer

    # The held-out documents are left out here too, so validation text is unseen by the merges.
    train_docs = select_split(read_sources(opts.sources), "train", val_fraction=opts.val_fraction)
    start = time.perf_counter()
    result = train_tokenizer((d.text for d in train_docs), opts.out, vocab_size=opts.vocab_size)
    seconds = time.perf_counter() - start
    tok = Tokenizer.from_file(result.path)
    print(f"trained {result.vocab_size:,} BPE tokens on {result.num_chars:,} characters in {seconds:.1f} s "
          f"-> {result.path}")
    print(f"ids 0..{tok.n_words - 1} ({result.vocab_size:,} + 256 special), sha256 {result.sha256[:16]}")
    held_out = [d.text for d in select_split(read_sources(opts.sources), "val", val_fraction=opts.val_fraction)]
    if held_out:
        n_bytes = sum(len(t.encode("utf-8")) for t in held_out)
        n_tokens = sum(len(ids) for ids in tok.encode_batch(held_out, bos=False, eos=False))
        print(f"held-out: {len(held_out)} docs, {n_bytes / n_tokens:.2f} bytes/token")


def cmd_data_tokenize(opts) -> None:
    import os
    import time

    from tqdm import tqdm

    from herd.data.corpora import check_sources, read_sources
    from herd.data.shards import tokenize_to_shards
    from herd.data.split import select_split
    from herd.tokenizer import llama3_tokenizer_path

    check_sources(opts.sources)
    tokenizer = opts.tokenizer or llama3_tokenizer_path()
    workers = opts.workers if opts.workers is not None else (os.cpu_count() or 1)
    splits = ("val", "train") if opts.val_fraction > 0 else ("train",)
    for split in splits:
        docs = select_split(read_sources(opts.sources), split, val_fraction=opts.val_fraction)
        out = Path(opts.out) / split
        complete_before = (out / "meta.json").is_file() and not opts.no_resume
        start = time.perf_counter()
        with tqdm(desc=split, unit=" docs", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
            def progress(n_docs: int, n_tokens: int) -> None:
                bar.update(n_docs - bar.n)
                bar.set_postfix_str(f"{n_tokens:,} tokens", refresh=False)

            info = tokenize_to_shards(docs, out, tokenizer_path=tokenizer, num_workers=workers,
                                      bos=not opts.no_bos, eos=not opts.no_eos, resume=not opts.no_resume,
                                      max_tokens_per_shard=opts.max_tokens_per_shard, progress=progress,
                                      source=f"{'+'.join(opts.sources)} ({split}, val_fraction={opts.val_fraction})")
        seconds = time.perf_counter() - start
        print(f"{split:>5}: {info.num_docs:,} docs, {info.num_tokens:,} tokens in {len(info.shards)} shard(s) "
              f"-> {info.path} " + ("(already complete)" if complete_before else f"({seconds:.1f} s)"))


def cmd_data_run(opts) -> None:
    from herd.data.pipeline import PipelineConfig, run_pipeline

    cfg = PipelineConfig.from_toml(opts.pipeline)
    report = run_pipeline(cfg, workers=opts.workers, fresh=opts.fresh)
    if opts.json:
        print(json.dumps(report.to_dict(), indent=1))
        return
    print(report.table())
    for name, out in report.outputs.items():
        tokens = f", {out['tokens']:,} tokens" if "tokens" in out else ""
        print(f"output {name}: {out.get('docs', 0):,} docs, {out.get('chars', 0) / 1e6:.2f} MB{tokens} -> {out['path']}")
    print(f"{report.seconds:.1f} s; report: {cfg.output_dir / 'report.json'}, {cfg.output_dir / 'report.html'}")


# Built-in sources for `herd data train-classifier --example LABEL=SOURCE`.
_CLASSIFIER_SOURCES = {
    "wiki-en": {"type": "wikipedia", "languages": ["en"]}, "wiki-fr": {"type": "wikipedia", "languages": ["fr"]},
    "wiki-es": {"type": "wikipedia", "languages": ["es"]}, "python-stdlib": {"type": "python_stdlib"},
    "austen": {"type": "austen"},
}


def _classifier_input(source: str) -> dict:
    """A reader entry for a built-in source name or a path (its suffix picks the reader)."""
    if source in _CLASSIFIER_SOURCES:
        return dict(_CLASSIFIER_SOURCES[source])
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--example: {source} is neither a file nor a folder nor one of the built-in sources "
                                f"({', '.join(_CLASSIFIER_SOURCES)})")
    name = path.name.lower()
    if path.is_dir():
        return {"type": "folder", "root": str(path), "glob": ["**/*.html", "**/*.htm"]}
    if name.endswith((".warc", ".warc.gz")):
        return {"type": "warc", "paths": [str(path)]}
    if name.endswith(".parquet"):
        return {"type": "parquet", "paths": [str(path)]}
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")):
        return {"type": "jsonl", "paths": [str(path)]}
    raise ValueError(f"--example: cannot tell how to read {source}; use .jsonl[.gz|.zst] with a \"text\" field, "
                     ".parquet, .warc[.gz] or a folder of HTML pages")


def cmd_data_train_classifier(opts) -> None:
    from herd.data.pipeline import TrainSpec, train_classifier

    examples = []
    for item in opts.example:
        label, sep, source = item.partition("=")
        if not sep or not label or not source:
            raise ValueError(f"--example takes LABEL=SOURCE (e.g. good=refs.jsonl), got {item!r}")
        examples.append({"label": label, "input": _classifier_input(source), "limit": opts.limit})
    if len({e["label"] for e in examples}) < 2:
        raise ValueError("a classifier needs at least two labels: give --example for each (e.g. hq=... and web=...)")
    options = {"epoch": opts.epochs} if opts.kind == "fasttext" else {"epochs": opts.epochs}
    spec = TrainSpec(model=opts.out, examples=examples, kind=opts.kind, chunk_chars=opts.chunk_chars,
                     options=options)
    info = train_classifier(spec, Path(opts.out), log=lambda m: None)
    print(f"trained {opts.kind} classifier on {sum(info['examples_per_label'].values()):,} examples "
          f"({', '.join(f'{k} {v:,}' for k, v in info['examples_per_label'].items())}) in {info['seconds']} s")
    print(f"held-out accuracy {info['accuracy']:.3f} on {info['valid']:,} examples -> {opts.out} "
          f"(use it in a pipeline: [[step]] type = \"classify\", model = \"{opts.out}\")")


def _report_out(opts, report) -> None:
    print(report.table())
    if opts.out:
        print(f"results written to {report.save(opts.out)}")


def cmd_eval_mc(opts) -> None:
    from herd.eval.multiple_choice import evaluate_mc, load_mc_jsonl
    from herd.eval.results import EvalReport

    lm = _load(opts)
    model, tok = lm.model, lm.tokenizer
    pool = load_mc_jsonl(opts.shots_file) if opts.shots_file else None
    tasks = []
    for path in opts.task:
        examples = load_mc_jsonl(path)[: opts.limit]
        res = evaluate_mc(model, tok, examples, task=Path(path).stem, num_shots=opts.shots, shots_pool=pool,
                          seed=opts.seed, batch_size=opts.batch_size)
        tasks.append(res.to_task_result())
    _report_out(opts, EvalReport(model=str(opts.path), tasks=tasks))


def cmd_eval_needle(opts) -> None:
    from herd.eval.needle import evaluate_needle, plot_needle_heatmap
    from herd.eval.results import EvalReport

    lm = _load(opts)
    model, tok = lm.model, lm.tokenizer
    res = evaluate_needle(model, tok, lengths=_ints(opts.lengths), depths=_floats(opts.depths), trials=opts.trials,
                          method=opts.method, filler=opts.filler, seed=opts.seed, batch_size=opts.batch_size)
    print(f"needle retrieval accuracy ({opts.method}, {opts.trials} trials per cell, filler {opts.filler}):")
    print(res.table())
    print(f"mean accuracy {res.mean_accuracy:.3f}")
    if opts.heatmap:
        print(f"heatmap written to {plot_needle_heatmap(res, opts.heatmap)}")
    if opts.out:
        print(f"results written to {EvalReport(model=str(opts.path), tasks=[res.to_task_result()]).save(opts.out)}")


def cmd_eval_lm_eval(opts) -> None:
    from herd.eval.lm_eval_adapter import run_lm_eval
    from herd.eval.results import EvalReport

    lm = _load(opts)
    model, tok = lm.model, lm.tokenizer
    tasks = run_lm_eval(model, tok, opts.tasks.split(","), num_fewshot=opts.num_fewshot, limit=opts.limit,
                        batch_size=opts.batch_size, include_path=opts.include_path)
    _report_out(opts, EvalReport(model=str(opts.path), tasks=tasks))


def cmd_scaling_fit(opts) -> None:
    from herd.eval.scaling import fit_scaling, load_points, plot_isoflops, plot_two_step

    fit = fit_scaling(load_points(opts.points), chance=opts.chance)
    print(fit.table())
    print(fit.summary())
    pred = fit.predict(opts.predict) if opts.predict else None
    if pred is not None:
        line = f"prediction at C = {pred.budget:.3g}: N* = {pred.n_opt:,.0f} params on {pred.tokens:,.0f} tokens"
        if pred.loss is not None:
            line += f", loss {pred.loss:.4f}"
        if pred.task_acc is not None:
            line += f", task NLL {pred.task_nll:.4f}, accuracy {pred.task_acc:.3f}"
        print(line)
    if opts.plot_dir:
        print(f"plot written to {plot_isoflops(fit, Path(opts.plot_dir) / 'isoflops.png', predict=pred)}")
        if fit.acc_vs_nll is not None:
            print(f"plot written to {plot_two_step(fit, Path(opts.plot_dir) / 'two_step.png', predict=pred)}")
    if opts.out:
        from herd.eval.results import atomic_write_text

        data = {**fit.to_dict(), "prediction": None if pred is None else dataclasses.asdict(pred)}
        print(f"fit written to {atomic_write_text(opts.out, json.dumps(data, indent=2) + chr(10))}")


def cmd_scaling_sweep(opts) -> None:
    from herd.eval.scaling import (
        SweepTraining,
        model_ladder,
        plan_isoflop_sweep,
        run_scaling_sweep,
        trainer_train_fn,
    )

    settings = SweepTraining(train=tuple(opts.train), val=tuple(opts.val), tokenizer=opts.tokenizer or "",
                             seq_len=opts.seq_len, batch_tokens=opts.batch_tokens, lr=opts.lr, device=opts.device,
                             task=opts.task)
    if opts.aspect_ratio < 1:
        raise ValueError(f"--aspect-ratio must be >= 1, got {opts.aspect_ratio}")
    ladder = model_ladder(vocab_size=opts.vocab_size, max_seq_len=opts.seq_len, depths=_ints(opts.depths),
                          aspect_ratio=opts.aspect_ratio)
    plan = plan_isoflop_sweep(_floats(opts.budgets), ladder, points_per_budget=opts.points_per_budget)
    print(f"{len(plan)} runs over {len({r.budget for r in plan})} budgets -> {opts.out}/points.jsonl", flush=True)
    outcome = run_scaling_sweep(
        plan, ladder, trainer_train_fn(settings, log=lambda msg: None), out_dir=opts.out, chance=opts.chance,
        held_out_budget=opts.held_out,
        on_point=lambda p: print(f"  {p.name}: N {p.n_params:,}, {p.tokens:,} tokens, val loss {p.loss:.4f}",
                                 flush=True))
    print(outcome.fit.table())
    print(outcome.fit.summary())
    if outcome.held_out is not None:
        h = outcome.held_out
        print(f"held-out C = {h.prediction.budget:.3g}: predicted N* {h.prediction.n_opt:,.0f}, loss "
              f"{h.prediction.loss:.4f}; trained {h.run.name} (N {h.measured.n_params:,}): loss "
              f"{h.measured.loss:.4f}, error {h.loss_error:+.4f}")
    print(f"plot written to {outcome.plot}; fit written to {outcome.fit_json}")


def cmd_serve(opts) -> None:
    from herd.serve.engine import Engine
    from herd.serve.server import serve

    lm = _load(opts)
    model, tok = lm.model, lm.tokenizer
    # The cache holds max_batch full contexts: cap the default at 8K (a 3.1 model's 128K x 8 slots
    # would not fit); --max-seq-len sets it explicitly.
    context = opts.max_seq_len or min(model.args.max_seq_len, 8192)
    engine = Engine(model, max_batch=opts.max_batch, max_queue=opts.max_queue, max_seq_len=context,
                    token_bytes=tok.decode_single_token_bytes, compile=opts.compile)
    name = opts.model_name or Path(opts.path).resolve().name
    print(f"herd serve: model {name!r} at http://{opts.host}:{opts.port}/v1, {opts.max_batch} slots x {context} "
          f"tokens, queue {opts.max_queue}{', API key required' if opts.api_key else ''}", file=sys.stderr)
    try:
        chat = lm.chat
    except ValueError as e:  # a base model without a template still serves /v1/completions
        chat = None
        print(f"herd serve: no chat format ({e}); /v1/chat/completions will answer 400", file=sys.stderr)
    serve(engine, tok, model_name=name, host=opts.host, port=opts.port, api_key=opts.api_key, chat=chat)


# ---- argument definitions --------------------------------------------------------------------


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint: HF or Meta directory, .gguf file, or herd quantize output")
    p.add_argument("--tokenizer", help="tokenizer file or folder; default: the one the checkpoint declares")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on CPU, the checkpoint's dtype elsewhere")
    p.add_argument("--max-seq-len", type=int, help="shorten the context (RoPE table and cache) to this many tokens")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6, Meta's)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--system", help="system prompt (chat format)")


def _info_args(p):
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _generate_args(p):
    _model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the 3.1 chat format")
    p.add_argument("--logprobs", action="store_true", help="print per-token log-probabilities")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end_of_text / eot / eom")


def _tokenize_args(p):
    p.add_argument("text", nargs="?", help="text to encode (default: stdin)")
    p.add_argument("--file", help="encode this UTF-8 file")
    p.add_argument("--tokenizer", help="tokenizer.json, tokenizer.model, .gguf or checkpoint folder (default: Llama 3's)")
    p.add_argument("--bos", action="store_true")
    p.add_argument("--eos", action="store_true")
    p.add_argument("--allow-special", action="store_true", help="parse <|...|> special-token text")
    p.add_argument("--count", action="store_true", help="print counts and characters/token only")
    p.add_argument("--pieces", action="store_true", help="print id:piece pairs")
    p.add_argument("--decode", help="decode these ids (space or comma separated) instead")


def _convert_args(p):
    p.add_argument("src", help="checkpoint directory (HF, Meta) or .gguf file")
    p.add_argument("dst", help="directory to write (hf, meta) or .gguf file (gguf)")
    p.add_argument("--to", choices=("hf", "meta", "gguf"), required=True)
    p.add_argument("--qtype", choices=("F32", "F16", "Q8_0", "Q4_0"), default="F16", help="GGUF weight type")
    p.add_argument("--num-shards", type=int, default=1, help="Meta model-parallel files to split into")
    p.add_argument("--overwrite", action="store_true")


def _serve_args(p):
    p.add_argument("path", help="checkpoint: HF or Meta directory, .gguf file, or herd quantize output")
    p.add_argument("--tokenizer", help="tokenizer file or folder; default: the one the checkpoint declares")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on CPU, the checkpoint's dtype elsewhere")
    p.add_argument("--max-seq-len", type=int, help="context per slot (default: the model's, at most 8192)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the /v1 routes")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (KV cache rows; default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 503")
    p.add_argument("--model-name", help="the model id clients use (default: the checkpoint directory's name)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (for GPUs; slower on CPU)")


def _demo_args(p):
    p.add_argument("--out", default="runs/demo", help="where the demo writes its files")
    p.add_argument("--quick", action="store_true",
                   help="every stage at a fraction of its size (about a minute): checks the chain, not the model")


def _plan_args(p):
    p.add_argument("--model", required=True, help="model preset, e.g. llama3.1-405b")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--seq", type=int, required=True, help="sequence length in tokens")
    p.add_argument("--gbs-tokens", required=True, help="global batch in tokens; K/M/G are powers of 1024 (16M)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per pipeline microbatch")
    p.add_argument("--pp-schedule", default="1F1B", help="GPipe, 1F1B, Interleaved1F1B, InterleavedZeroBubble, "
                   "ZBVZeroBubble")
    p.add_argument("--ac", default="none", choices=("none", "selective", "full"),
                   help="activation checkpointing for FLOPs and traffic (memory is shown for all three)")
    p.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation for the step time")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU peak (H100 SXM dense bf16: 989)")
    p.add_argument("--gpu-memory-gib", type=float, default=74.5, help="usable GPU memory (80 GB H100: 74.5 GiB)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _quantize_args(p):
    p.add_argument("path", help="float checkpoint: HF or Meta directory, or .gguf file (its Q4_0/Q4_1 blocks are kept)")
    p.add_argument("out", help="directory to write (quant_config.json + model.safetensors + tokenizer)")
    p.add_argument("--scheme", choices=("int8", "int4", "fp8"), required=True,
                   help="int8: per-channel; int4: asymmetric groups; fp8: the paper's FFN-only row-wise rule")
    p.add_argument("--group-size", type=int, default=32, help="int4 inputs per scale/min pair (default 32)")
    p.add_argument("--activations", choices=("float", "int8"), default="float",
                   help="CPU decode with int8/int4 weights: float keeps activations exact; int8 quantizes them "
                        "per block of 32 for integer dot products (faster, a small bounded error)")
    p.add_argument("--head", choices=("int8", "same", "float"), help="output head: int8 (default for int8/int4), "
                   "same (the scheme's own format), float; fp8 never quantizes it")
    p.add_argument("--overwrite", action="store_true")


def _eval_perplexity_args(p):
    p.add_argument("path", help="checkpoint: HF or Meta directory, .gguf file, or herd quantize output")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", metavar="FILE", help="UTF-8 text file to score")
    src.add_argument("--wiki", choices=("en", "fr", "es"), help="held-out Wikipedia lead paragraphs (embedded)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="the document split's held-out share (0.01)")
    p.add_argument("--schemes", nargs="*", default=[], choices=("int8", "int4", "fp8"),
                   help="also score the model quantized with each scheme and report the change")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size for --schemes")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--stride", type=int, help="window step (default: seq-len, disjoint windows)")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens of the text")
    p.add_argument("--tokenizer", help="tokenizer file or folder; default: the one the checkpoint declares")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _train_args(p):
    p.add_argument("config", help="run config TOML (see configs/debug.toml)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--section.key VALUE",
                   help="override config values, e.g. --optim.lr 3e-4 --stages.pretrain.steps 200; "
                   "--nproc N runs N local processes under torchrun (with --parallel.tp 2 ...)")


def _export_args(p):
    p.add_argument("checkpoint", help="a run directory (its newest good checkpoint) or checkpoints/step-N")
    p.add_argument("out", help="directory to write")
    p.add_argument("--format", choices=("hf", "meta"), default="hf")
    p.add_argument("--tokenizer", help="tokenizer.model to copy beside the weights (default: the run's)")
    p.add_argument("--overwrite", action="store_true")


def _sources_arg(p):
    p.add_argument("--sources", nargs="+", required=True, metavar="SOURCE",
                   help="wiki-en, wiki-fr, wiki-es, austen, python-stdlib, or JSONL files with a \"text\" field")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="share of documents held out by id hash (default 0.01; use the same value everywhere)")


def _tokenizer_train_args(p):
    _sources_arg(p)
    p.add_argument("--vocab-size", type=int, default=4096, help="base tokens incl. the 256 bytes (default 4096)")
    p.add_argument("--out", required=True, help="rank file to write, e.g. runs/tok/tokenizer.model")


def _data_tokenize_args(p):
    _sources_arg(p)
    p.add_argument("--tokenizer", help="tiktoken rank file (default: the Llama 3 tokenizer)")
    p.add_argument("--out", required=True, help="writes OUT/train and OUT/val shard directories")
    p.add_argument("--workers", type=int, help="tokenizer processes (default: one per CPU core; 0: in-process)")
    p.add_argument("--max-tokens-per-shard", type=int, default=2**27)
    p.add_argument("--no-bos", action="store_true", help="do not start documents with <|begin_of_text|>")
    p.add_argument("--no-eos", action="store_true", help="do not end documents with <|end_of_text|>")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming an interrupted run")


def _data_run_args(p):
    p.add_argument("pipeline", help="pipeline TOML file (see herd/data/pipeline.py and configs/data/)")
    p.add_argument("--workers", type=int, help="processes (default: [pipeline] workers)")
    p.add_argument("--fresh", action="store_true", help="discard a previous run's work in output_dir instead of resuming")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")


def _data_train_classifier_args(p):
    p.add_argument("--example", action="append", required=True, metavar="LABEL=SOURCE",
                   help="labelled examples: a JSONL / Parquet / WARC file, a folder of HTML, or one of "
                        + ", ".join(_CLASSIFIER_SOURCES) + " (repeat, at least two labels)")
    p.add_argument("--out", required=True, help="model file to write (.bin for fastText, .pt for the transformer)")
    p.add_argument("--kind", choices=["fasttext", "transformer"], default="fasttext")
    p.add_argument("--limit", type=int, help="examples per --example at most (long documents count per chunk)")
    p.add_argument("--chunk-chars", type=int, default=2000, help="long documents are cut into pieces of this size")
    p.add_argument("--epochs", type=int, default=10)


def _ints(text: str) -> list[int]:
    try:
        return [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def _eval_model_args(p):
    p.add_argument("path", help="checkpoint: HF or Meta directory, .gguf file, or herd quantize output")
    p.add_argument("--tokenizer", help="tokenizer file or folder; default: the one the checkpoint declares")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on CPU, the checkpoint's dtype elsewhere")
    p.add_argument("--max-seq-len", type=int, help="set the context (RoPE table) to this many tokens")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass")
    p.add_argument("--out", help="write the results as JSON here")


def _eval_mc_args(p):
    _eval_model_args(p)
    p.add_argument("--task", action="append", required=True,
                   help='JSONL file, one {"question", "choices", "answer"} per line; repeat for several tasks')
    p.add_argument("--shots", type=int, default=0, help="few-shot examples before each question")
    p.add_argument("--shots-file", help="draw shots from this JSONL (default: the task itself, never the same example)")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples of each task")
    p.add_argument("--seed", type=int, default=0, help="which shots are drawn")


def _eval_needle_args(p):
    _eval_model_args(p)
    p.add_argument("--lengths", default="256,512,1024", help="context lengths in tokens, comma-separated")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1], comma-separated")
    p.add_argument("--trials", type=int, default=4, help="keys (and haystack windows) per cell")
    p.add_argument("--method", choices=("loglik", "generate"), default="loglik",
                   help="loglik: answer tokens are all argmax (one forward); generate: greedy decoding")
    p.add_argument("--filler", default="passkey", help="passkey, wikipedia, or a UTF-8 text file")
    p.add_argument("--heatmap", help="write the accuracy heatmap PNG here")
    p.add_argument("--seed", type=int, default=0)


def _eval_lm_eval_args(p):
    _eval_model_args(p)
    p.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated (the data must be available)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--limit", type=int, help="examples per task")
    p.add_argument("--include-path", help="a folder of your own lm-eval task YAMLs")


def _scaling_fit_args(p):
    p.add_argument("points", help="sweep results JSONL: name, budget, n_params, loss[, task_nll, task_acc] per line")
    p.add_argument("--predict", type=float, help="predict N*, tokens, loss (and task accuracy) at this budget")
    p.add_argument("--chance", type=float, help="task accuracy of random guessing (pins the sigmoid's floor)")
    p.add_argument("--plot-dir", help="write isoflops.png (and two_step.png) here")
    p.add_argument("--out", help="write the fitted constants and the prediction as JSON here")


def _scaling_sweep_args(p):
    p.add_argument("--train", action="append", required=True, help="token-shard directory to train on (repeatable)")
    p.add_argument("--val", action="append", required=True, help="held-out token-shard directory (repeatable)")
    p.add_argument("--tokenizer", help="the shards' tokenizer.model (needed with --task)")
    p.add_argument("--vocab-size", type=int, required=True, help="the shards' vocabulary size")
    p.add_argument("--budgets", required=True, help="compute budgets in FLOPs, comma-separated, e.g. 1e12,3e12,1e13")
    p.add_argument("--depths", default="1,2,3,4,5,6,7,8", help="model depths of the size ladder (width = aspect x depth)")
    p.add_argument("--aspect-ratio", type=int, default=32,
                   help="width per layer of the size rule (rounded to whole 16-wide heads); smaller reaches smaller N")
    p.add_argument("--points-per-budget", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--task", help="multiple-choice JSONL scored after each run (two-step method)")
    p.add_argument("--chance", type=float, help="the task's chance accuracy")
    p.add_argument("--held-out", type=float, help="then predict this larger budget, train it, and report the error")
    p.add_argument("--out", required=True, help="sweep directory: points.jsonl (resumable), runs, isoflops.png")


# ---- post-training (herd.posttrain) ----------------------------------------------------------


def _posttrain(opts, config_cls: str, run: str):
    import importlib

    from herd.posttrain import config as pt_config

    cfg = pt_config.load_config(getattr(pt_config, config_cls), opts.config, opts.overrides)
    module, _, fn = run.rpartition(".")
    return getattr(importlib.import_module(f"herd.posttrain.{module}"), fn)(cfg)


def _print_report(report: dict) -> None:
    for key, value in report.items():
        print(f"{key:>28}  {value:.4f}" if isinstance(value, float) else f"{key:>28}  {value}")


def cmd_sft(opts) -> None:
    result = _posttrain(opts, "SFTConfig", "sft.run_sft")
    _print_report({"steps": result.fit.steps, "final loss": result.fit.losses[-1], "val loss": result.val_loss,
                   "tokens/s": result.fit.tokens_per_s, "train dialogs": result.train_examples,
                   "packed rows": result.packed_rows, "output": result.output})


def cmd_rm(opts) -> None:
    _print_report(_posttrain(opts, "RewardConfig", "reward.run_reward"))


def cmd_rs(opts) -> None:
    _print_report(_posttrain(opts, "RejectionConfig", "rejection.run_rejection"))


def cmd_dpo(opts) -> None:
    _print_report(_posttrain(opts, "DPOConfig", "dpo.run_dpo"))


def cmd_distill(opts) -> None:
    _print_report(_posttrain(opts, "DistillConfig", "distill.run_distill"))


def cmd_prune(opts) -> None:
    _print_report(_posttrain(opts, "PruneConfig", "prune.run_prune"))


def _posttrain_args(p):
    p.add_argument("config", help="TOML config (see configs/posttrain_*.toml)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--section.key VALUE",
                   help="override config values, e.g. --optim.lr 1e-4 --lora.rank 8")


# name -> (function, one-line help, argument builder). A name with a space is a nested command.
COMMANDS: dict[str, tuple[Callable, str, Callable]] = {
    "info": (cmd_info, "describe a checkpoint: format, shapes, dtype, size", _info_args),
    "generate": (cmd_generate, "complete prompts (streamed)", _generate_args),
    "chat": (cmd_chat, "interactive chat with history, /reset, Ctrl-D to quit", _model_args),
    "tokenize": (cmd_tokenize, "encode or decode text with a tiktoken tokenizer", _tokenize_args),
    "convert": (cmd_convert, "convert a checkpoint between HF, Meta and GGUF formats", _convert_args),
    "demo": (cmd_demo, "the end-to-end demo on embedded data", _demo_args),
    "plan": (cmd_plan, "size a parallel training layout: memory per GPU, step FLOPs, traffic", _plan_args),
    "quantize": (cmd_quantize, "quantize a checkpoint to int8, int4 or FP8 (with scales, safetensors)",
                 _quantize_args),
    "eval perplexity": (cmd_eval_perplexity, "perplexity and bits/byte on a text, per quantization scheme",
                        _eval_perplexity_args),
    "train": (cmd_train, "pretrain from a TOML config: stages, checkpoints, resume", _train_args),
    "export": (cmd_export, "export a training checkpoint as an HF or Meta directory", _export_args),
    "serve": (cmd_serve, "OpenAI-compatible HTTP server with continuous batching", _serve_args),
    "sft": (cmd_sft, "supervised finetuning on chat JSONL (assistant tokens only; full, LoRA or QLoRA)",
            _posttrain_args),
    "rm": (cmd_rm, "train a reward model on preference JSONL (Bradley-Terry, edited > chosen > rejected)",
           _posttrain_args),
    "rs": (cmd_rs, "rejection sampling: K samples per prompt, keep the reward model's best", _posttrain_args),
    "dpo": (cmd_dpo, "DPO on preference JSONL (beta, NLL term, formatting tokens masked)", _posttrain_args),
    "distill": (cmd_distill, "logit distillation from a teacher (forward KL at a temperature + CE)",
                _posttrain_args),
    "prune": (cmd_prune, "structured width/depth pruning by activation importance, then distillation",
              _posttrain_args),
    "tokenizer train": (cmd_tokenizer_train, "train a small BPE vocabulary (tiktoken rank file)", _tokenizer_train_args),
    "data tokenize": (cmd_data_tokenize, "tokenize sources into train/val token shards", _data_tokenize_args),
    "data train-classifier": (cmd_data_train_classifier, "train a fastText or tiny-transformer quality/domain "
                              "classifier from labelled sources", _data_train_classifier_args),
    "data run": (cmd_data_run, "run a data-curation pipeline file (extract, dedup, filter, mix, shards)", _data_run_args),
    "eval mc": (cmd_eval_mc, "multiple-choice accuracy (acc, acc_norm) on JSONL tasks", _eval_mc_args),
    "eval needle": (cmd_eval_needle, "needle-in-a-haystack accuracy by context length and depth", _eval_needle_args),
    "eval lm-eval": (cmd_eval_lm_eval, "run EleutherAI lm-eval tasks on a herd model", _eval_lm_eval_args),
    "scaling fit": (cmd_scaling_fit, "fit IsoFLOP minima, N*(C), the loss floor and the two-step method",
                    _scaling_fit_args),
    "scaling sweep": (cmd_scaling_sweep, "train an IsoFLOP sweep of small models, fit it, check a held-out budget",
                      _scaling_sweep_args),
}


def build_parser() -> argparse.ArgumentParser:
    """Keys with a space ("data tokenize") become nested commands: `herd data tokenize ...`."""
    parser = argparse.ArgumentParser(prog="herd", description="Llama 3 in PyTorch: models, tokenizer, inference.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (_, help_text, add_args) in COMMANDS.items():
        group, _, leaf = name.partition(" ")
        if not leaf:
            p = sub.add_parser(name, help=help_text, description=help_text)
        else:
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} commands")
                groups[group] = gp.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
            p = groups[group].add_parser(leaf, help=help_text, description=help_text)
        p.set_defaults(command_name=name)
        add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    opts.command = opts.command_name
    try:
        COMMANDS[opts.command][0](opts)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"herd {opts.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0
