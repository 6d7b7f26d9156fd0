"""`make demo` / `herd demo`: the real pieces on real embedded data, in about a minute.

Until training lands the model in this demo is *untrained* (random weights), and it says so.
What is real: the Llama 3 tokenizer and chat format on Wikipedia leads in three languages and
on Python source; checkpoint conversion HF -> Meta (split over 2 model-parallel files) -> HF
with an exact-equality check on the logits; streamed generation through the KV cache.
Everything the demo prints is also written to `<out>/demo.json`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from herd.data.corpora import WIKI_LANGUAGES, python_stdlib_sources, wikipedia_leads
from herd.generate import SamplingParams, stream_text
from herd.model import ModelArgs, build_model
from herd.model.formats import convert, load_model, save_model
from herd.tokenizer import ChatFormat, Message, Tokenizer, llama3_tokenizer_path

GOLDEN = ("This is a test sentence.", [128000, 2028, 374, 264, 1296, 11914, 13, 128001])


def _rule(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 72 - len(title)))


def compression_table(tok: Tokenizer) -> list[dict]:
    """Characters and bytes per token on each embedded slice (higher = better compression)."""
    slices = {f"wikipedia-{lang}": lambda lang=lang: wikipedia_leads(lang) for lang in WIKI_LANGUAGES}
    slices["python-stdlib"] = lambda: python_stdlib_sources(limit=400)
    rows = []
    for name, docs in slices.items():
        texts = [d.text for d in docs()]
        ids = tok.encode_batch(texts, bos=False, eos=False)
        n_tok = sum(len(x) for x in ids)
        n_chr = sum(len(t) for t in texts)
        n_byte = sum(len(t.encode("utf-8")) for t in texts)
        rows.append(dict(slice=name, docs=len(texts), characters=n_chr, tokens=n_tok,
                         chars_per_token=round(n_chr / n_tok, 3), bytes_per_token=round(n_byte / n_tok, 3)))
    return rows


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
    return dict(tokens=len(enc.tokens), assistant_tokens=sum(enc.assistant_mask), assistant_text=trained,
                rendered=tok.decode(enc.tokens))


def round_trip(tok: Tokenizer, out_dir: Path) -> tuple[torch.nn.Module, dict]:
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
        back_dir = Path(tmp) / "hf-again"
        convert(meta_dir, back_dir, to="hf")
        reloaded = load_model(back_dir).eval()
        files = {d.name: sorted(p.name for p in d.iterdir()) for d in (hf_dir, meta_dir, back_dir)}
    probe = torch.tensor([tok.encode("Round trips must be exact.", bos=True, eos=False)])
    with torch.no_grad():
        identical = torch.equal(model(probe), reloaded(probe))
    return reloaded, dict(params=args.num_params(), logits_identical=identical, files=files,
                          hf_dir=str(hf_dir), meta_dir=str(meta_dir))


def run_demo(out_dir: Path = Path("runs/demo")) -> dict:
    t0 = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {}

    _rule("Llama 3 tokenizer (tiktoken engine, 128,000 BPE ranks + 256 special tokens)")
    tok = Tokenizer.from_file(llama3_tokenizer_path())
    ids = tok.encode(GOLDEN[0], bos=True, eos=True)
    print(f"{GOLDEN[0]!r} -> {ids}  ({'matches' if ids == GOLDEN[1] else 'DOES NOT MATCH'} Meta's test vector)")
    report["golden_ok"] = ids == GOLDEN[1]

    _rule("Compression on the embedded corpora")
    rows = compression_table(tok)
    print(f"{'slice':<16}{'docs':>7}{'characters':>13}{'tokens':>11}{'chars/token':>13}{'bytes/token':>13}")
    for r in rows:
        print(f"{r['slice']:<16}{r['docs']:>7}{r['characters']:>13,}{r['tokens']:>11,}"
              f"{r['chars_per_token']:>13.2f}{r['bytes_per_token']:>13.2f}")
    report["compression"] = rows

    _rule("Chat format 3.1 (the assistant mask is what SFT trains on)")
    chat = chat_example(tok)
    print(chat["rendered"])
    print(f"\n{chat['tokens']} tokens; {chat['assistant_tokens']} in the assistant mask: {chat['assistant_text']!r}")
    report["chat"] = chat

    _rule("Checkpoint formats: HF -> Meta (2 model-parallel files) -> HF")
    model, rt = round_trip(tok, out_dir)
    for name, files in rt["files"].items():
        print(f"{name:>15}: {', '.join(files)}")
    print(f"{rt['params']:,} parameters; logits after the round trip are "
          f"{'bit-identical' if rt['logits_identical'] else 'DIFFERENT'}")
    print(f"kept for trying the other commands: {rt['hf_dir']}, {rt['meta_dir']} (untrained)")
    report["round_trip"] = {k: v for k, v in rt.items() if k != "files"}

    _rule("Generation through the KV cache -- UNTRAINED MODEL (random weights): expect gibberish")
    fmt = ChatFormat(tok, version="3.1")
    prompt = fmt.encode_dialog_prompt([Message(role="user", content="Tell me about llamas.")]).tokens
    print("user> Tell me about llamas.\nllama> ", end="", flush=True)
    events = stream_text(model, tok, [prompt], max_new_tokens=24, sampling=SamplingParams(temperature=0.8, seed=0))
    text = ""
    while True:
        try:
            event = next(events)
        except StopIteration as done:
            result = done.value[0]
            break
        text += event.texts[0]
        print(event.texts[0], end="", flush=True)
    print(f"\n[{len(result.tokens)} tokens, finish: {result.finish_reason}]")
    report["generation"] = dict(untrained=True, text=text, finish_reason=result.finish_reason)

    report["seconds"] = round(time.time() - t0, 1)
    path = out_dir / "demo.json"
    fd, tmp_name = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    os.replace(tmp_name, path)  # atomic: a crash never leaves half a report
    _rule(f"done in {report['seconds']} s; report written to {path}")
    print(f"next: herd info {rt['hf_dir']}   |   herd chat {rt['hf_dir']}")
    if not (report["golden_ok"] and rt["logits_identical"]):
        raise ValueError("the demo's exactness checks failed (see above)")
    return report
