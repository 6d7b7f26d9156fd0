"""`herd info`, `generate`, `chat`, `tokenize`, `serve`: opening a checkpoint and talking to it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from herd.cli.chat import cmd_chat
from herd.cli.common import CHECKPOINT_HELP, add_checkpoint_args, add_sampling_args, load, sampling
from herd.cli.speculative import check_draft_flags, generate_speculative, load_draft
from herd.cli.serve_q4 import attach_q4_twin, check_q4_decode


def cmd_info(opts) -> None:
    from herd.model.formats import describe
    from herd.model.mllama_io import is_mllama_dir

    if is_mllama_dir(opts.path):
        return _info_vision(opts)
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


def _info_vision(opts) -> None:
    from herd.model.mllama_io import read_mllama_args

    fmt, a, files = read_mllama_args(opts.path)
    t, v = a.text, a.vision
    n = a.num_params()
    on_disk = sum(f.stat().st_size for f in files)
    if opts.json:
        print(json.dumps({"path": str(opts.path), "format": fmt, "model": "llama3.2-vision", "num_params": n,
                          "bytes_on_disk": on_disk, "files": [f.name for f in files]}, indent=2))
        return
    rows = [
        ("path", str(opts.path)),
        ("format", {"hf": "Hugging Face safetensors (mllama)", "meta": "Meta consolidated.*.pth (vision)"}[fmt]),
        ("files", ", ".join(f.name for f in files)),
        ("parameters", f"{n:,} ({n / 1e9:.3f} B)"),
        ("size on disk", f"{on_disk / 2**20:,.1f} MiB"),
        ("text layers", f"{t.n_layers} self + {a.n_cross_layers} cross (before self layers "
                        f"{', '.join(map(str, a.fusion_schedule))}) / dim {t.dim}"),
        ("heads (q / kv)", f"{t.n_heads} / {t.n_kv_heads}, head_dim {t.head_dim}"),
        ("vocabulary", f"{t.vocab_size:,} + 8 (<|image|> = {t.vocab_size})"),
        ("context", f"{t.max_seq_len:,} tokens"),
        ("vision encoder", f"width {v.width}, {v.n_layers} local + {v.n_global_layers} global layers, "
                           f"{v.n_heads} heads, features of layers {', '.join(map(str, v.intermediate_layers))}"),
        ("tiles", f"{v.image_size} px, patch {v.patch_size}, up to {v.max_num_tiles} "
                  f"({len(v.aspect_ratios)} aspect ratios), {v.n_tokens} tokens each"),
    ]
    for k, val in rows:
        print(f"{k:>16}  {val}")


def _attach_loras(model, specs: list[str] | None):
    """`--lora NAME=PATH` values (or bare PATHs, named after their directory) attached to `model`;
    None without any."""
    if not specs:
        return None
    from herd.generate.adapters import attach_adapters, read_adapter

    adapters = []
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq:
            name, path = Path(spec).expanduser().resolve().name, spec
        if not name or not path:
            raise ValueError(f"--lora takes NAME=PATH (an adapter directory), got {spec!r}")
        adapters.append(read_adapter(path, model.args, name=name))
    return attach_adapters(model, adapters)


def _read_schema(path: str) -> dict:
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--json-schema: no file {path!r}; pass a JSON Schema file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--json-schema: {path} is not a JSON file ({e})") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"--json-schema: {path} must hold a JSON Schema object, got a JSON {type(schema).__name__}")
    return schema


def _tp_launch(opts) -> bool:
    """`--tp N` outside torchrun: check the checkpoint splits, then re-run the command line in N
    processes (the spelling `herd train --nproc N` uses). True when that happened."""
    from herd.parallel.launch import run_under_torchrun, world_size_from_env

    if opts.tp < 1:
        raise ValueError(f"--tp must be a positive number of ranks, got {opts.tp}")
    world = world_size_from_env()
    if opts.tp == 1 and world > 1:
        raise ValueError(f"this process is one of a torchrun group of {world}; pass --tp {world} so the ranks share "
                         "one model instead of each running it whole")
    if opts.tp == 1 or world > 1:
        return False
    _check_tp_checkpoint(opts.path, opts.tp)  # fail here, once, not in N processes
    if opts.device.startswith("cuda"):
        from herd.parallel.inference import check_gpus

        check_gpus(opts.tp)
    code = run_under_torchrun(opts.tp, opts.argv)
    if code:
        raise SystemExit(code)
    return True


def _check_tp_checkpoint(path, tp: int) -> None:
    from herd.model.formats import describe
    from herd.parallel.inference import check_tp_inference
    from herd.quant import is_quantized_checkpoint

    if Path(path).exists() and is_quantized_checkpoint(Path(path)):
        raise ValueError(f"--tp loads HF, Meta and GGUF checkpoints; {path} is `herd quantize` output, which is "
                         "not sharded yet: run it with --tp 1, or pass the unquantized checkpoint")
    check_tp_inference(describe(path).args, tp)


def _load_tp(opts):
    """This rank's shard and the tokenizer, inside a torchrun group of opts.tp processes."""
    from herd.generate.loading import LoadedModel
    from herd.parallel.inference import init_tp, load_tp_model
    from herd.tokenizer import load_tokenizer

    _check_tp_checkpoint(opts.path, opts.tp)
    tp, opts.device = init_tp(opts.tp, opts.device)
    model = load_tp_model(opts.path, tp, dtype=opts.dtype, device=opts.device, max_seq_len=opts.max_seq_len)
    tok = load_tokenizer(Path(opts.path), opts.tokenizer, vocab_size=model.args.vocab_size)
    return LoadedModel(model=model, tokenizer=tok, path=Path(opts.path)), tp


def cmd_generate(opts) -> None:
    import contextlib
    import dataclasses
    import os

    if opts.image:
        return _generate_with_images(opts)
    if opts.input is not None or opts.output is not None:
        for flag, bad in (("--json-schema", opts.json_schema), ("--tp", opts.tp != 1), ("--lora", opts.lora),
                          ("--draft", opts.draft)):
            if bad:
                raise ValueError(f"{flag} is for --prompt runs; batch mode (--input/--output) does not take it yet")
        return _generate_batch(opts)
    if not opts.prompt:
        raise ValueError("give --prompt TEXT (repeatable), or --input prompts.jsonl --output out.jsonl for batch mode")
    for flag in ("nproc", "max_batch", "n", "stop"):
        if getattr(opts, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} belongs to batch mode (--input/--output)")
    check_draft_flags(opts)
    schema = None
    if opts.json_schema:
        if opts.ignore_eos:
            raise ValueError("--json-schema ends the output with a stop token, so it cannot go with --ignore-eos")
        schema = _read_schema(opts.json_schema)  # before the checkpoint is read: fail fast
    if opts.lora and opts.tp != 1:
        raise ValueError("--lora is not supported with --tp yet (the adapters are not sliced); run with --tp 1")
    if _tp_launch(opts):
        return
    if opts.tp == 1:
        lm = load(opts)
        if opts.draft:
            generate_speculative(opts, lm, load_draft(opts, lm), sampling(opts))
        else:
            _generate(opts, lm, sampling(opts), schema)
        return
    import torch.distributed as dist

    from herd.parallel.inference import shared_seed

    try:
        lm, tp = _load_tp(opts)
        params = sampling(opts)
        if not params.greedy:
            params = dataclasses.replace(params, seed=shared_seed(params.seed, tp))
        if tp.rank == 0:
            _generate(opts, lm, params, schema)
        else:  # the other ranks run the same steps; only rank 0 prints
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                _generate(opts, lm, params, schema)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _generate(opts, lm, params, schema: dict | None) -> None:
    from herd.generate import stream_text

    tok = lm.tokenizer
    adapters = _attach_loras(lm.model, [opts.lora] if opts.lora else None)
    if adapters is not None:
        adapters.select_all(adapters.names[0])  # every row of the batch, prefill and decode
    processors = ()
    if schema is not None:
        from herd.generate.grammar import GrammarCompiler

        try:
            compiler = GrammarCompiler(tok, lm.model.args.vocab_size, stop_tokens=lm.stop_tokens)
        except ImportError as e:
            raise ValueError(str(e)) from None
        processors = (compiler.json_schema(schema, strict=True).processor,)
    if opts.chat:
        if len(opts.prompt) > 1:
            raise ValueError("--chat takes one --prompt (one user turn); use `herd chat` for a conversation")
        prompts = [lm.encode_user_turn(opts.prompt[0], system=opts.system)]
    else:
        prompts = [lm.encode_text(p) for p in opts.prompt]
    stop = lm.stop_tokens if not opts.ignore_eos else ()
    events = stream_text(lm.model, tok, prompts, max_new_tokens=opts.max_new_tokens, sampling=params,
                         stop_tokens=stop, logprobs=opts.logprobs, logits_processors=processors)
    single = len(prompts) == 1  # a single prompt is streamed as it is produced
    if single:  # with a schema stdout is the JSON alone, ready for a pipe
        print(opts.prompt[0] if not (opts.chat or schema is not None) else "", end="", flush=True)
    while True:
        try:
            event = next(events)
        except StopIteration as done:
            results = done.value
            break
        if single and event.texts[0]:
            print(event.texts[0], end="", flush=True)
    if single:
        print()
    else:
        for p, r in zip(opts.prompt, results):
            print(f"--- {p!r}\n{p}{tok.decode(r.tokens)}")
    for r in results:
        line = f"[{len(r.tokens)} tokens, finish: {r.finish_reason}]"
        if opts.logprobs and r.logprobs:
            line += " logprobs: " + " ".join(f"{tok.decode([t])!r}:{lp:.3f}" for t, lp in zip(r.tokens, r.logprobs))
        print(line, file=sys.stderr)


def _generate_with_images(opts) -> None:
    from herd.generate.vision import generate_with_images, load_vision_for_inference

    refused = (("--input/--output", opts.input is not None or opts.output is not None), ("--tp", opts.tp != 1),
               ("--lora", opts.lora), ("--json-schema", opts.json_schema), ("--logprobs", opts.logprobs),
               ("--draft", opts.draft))
    for flag, bad in refused:
        if bad:
            raise ValueError(f"{flag} does not go with --image yet; drop one of them")
    if not opts.prompt or len(opts.prompt) != 1:
        raise ValueError("--image takes one --prompt TEXT, the text that follows the image(s)")
    lm = load_vision_for_inference(opts.path, tokenizer=opts.tokenizer, dtype=opts.dtype, device=opts.device)
    images = lm.preprocess(opts.image)
    prompt = lm.encode_prompt(opts.prompt[0], len(opts.image), chat=opts.chat, system=opts.system)
    [result] = generate_with_images(lm.model, [prompt], images, max_new_tokens=opts.max_new_tokens,
                                    sampling=sampling(opts), stop_tokens=() if opts.ignore_eos else lm.stop_tokens)
    print(("" if opts.chat else opts.prompt[0]) + lm.tokenizer.decode(result.tokens))
    print(f"[{len(result.tokens)} tokens, finish: {result.finish_reason}]", file=sys.stderr)


def _generate_batch(opts) -> None:
    """`herd generate --input prompts.jsonl --output out.jsonl`: through the engine, resumable."""
    from herd.serve.batch import BatchJob, run_batch_job
    from herd.serve.batch_io import BatchDefaults

    if opts.input is None or opts.output is None:
        raise ValueError("batch mode needs both --input prompts.jsonl and --output out.jsonl")
    if opts.prompt:
        raise ValueError("--prompt and --input are alternatives: put the prompts in the --input file")
    for flag in ("logprobs", "ignore_eos"):
        if getattr(opts, flag):
            raise ValueError(f"--{flag.replace('_', '-')} is not supported with --input (batch mode)")
    if opts.system is not None and not opts.chat:
        raise ValueError("--system applies to \"prompt\" lines wrapped with --chat; \"messages\" lines carry their "
                         "own system message")
    if opts.nproc is not None and opts.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {opts.nproc}")
    max_batch = 8 if opts.max_batch is None else opts.max_batch
    n = 1 if opts.n is None else opts.n
    if max_batch < 1 or not 1 <= n <= max_batch:
        raise ValueError(f"need --max-batch >= 1 and 1 <= --n <= --max-batch (one slot per choice), got "
                         f"--max-batch {max_batch} --n {n}")
    s = sampling(opts)
    defaults = BatchDefaults(max_tokens=opts.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                             n=n, seed=opts.seed, stop=tuple(opts.stop or ()))
    job = BatchJob(checkpoint=opts.path, input=opts.input, output=opts.output, defaults=defaults,
                   tokenizer=opts.tokenizer, device=opts.device, dtype=opts.dtype, context=opts.max_seq_len,
                   max_batch=max_batch, nproc=opts.nproc or 1, strict=opts.strict, overwrite=opts.overwrite,
                   progress=True, chat=opts.chat, system=opts.system)
    stats = run_batch_job(job)
    for problem in stats.skipped[:10]:
        print(f"herd generate: skipped {problem}", file=sys.stderr)
    if len(stats.skipped) > 10:
        print(f"herd generate: ... and {len(stats.skipped) - 10} more skipped lines", file=sys.stderr)
    print(json.dumps({**stats.summary(), "output": opts.output}))
    if stats.failed:
        raise ValueError(f"{stats.failed} request(s) failed in the engine (see above); rerun the same command to "
                         "retry them")


def cmd_tokenize(opts) -> None:
    from herd.tokenizer import llama3_tokenizer_path, tokenizer_from_path

    tok = tokenizer_from_path(opts.tokenizer or llama3_tokenizer_path())
    if opts.decode is not None:
        try:
            ids = [int(t) for t in opts.decode.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"--decode takes token ids separated by spaces or commas, got {opts.decode!r}") from None
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


def cmd_serve(opts) -> None:
    if opts.body_timeout <= 0:
        raise ValueError(f"--body-timeout must be a positive number of seconds, got {opts.body_timeout}")
    for flag, value in (("--block-size", opts.block_size), ("--kv-blocks", opts.kv_blocks),
                        ("--prefill-chunk", opts.prefill_chunk)):
        if value is not None and value < 1:  # checked before the (slow) model load
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if opts.draft is None and opts.draft_k is not None:
        raise ValueError("--draft-k sets how many tokens the draft proposes; it needs --draft PATH")
    if opts.draft is not None:
        if opts.draft_k is not None and opts.draft_k < 1:
            raise ValueError(f"--draft-k must be at least 1 (tokens the draft proposes per step), got {opts.draft_k}")
        for flag, bad in (("--compile", opts.compile), ("--lora", opts.lora), ("--tp", opts.tp != 1)):
            if bad:
                raise ValueError(f"--draft (speculative decoding) does not support {flag} yet; leave out one of them")
    if opts.tp != 1:
        for flag, bad, why in (("--lora", opts.lora, "the adapters are not sliced"),
                               ("--compile", opts.compile, "the compiled step does not take the ranks' collectives")):
            if bad:
                raise ValueError(f"{flag} is not supported with --tp yet ({why}); run with --tp 1 or leave out {flag}")
    from herd.model.mllama_io import is_mllama_dir

    if is_mllama_dir(opts.path):  # Llama 3.2 Vision: text and image_url requests in one batch
        from herd.cli.serve_vision import serve_vision

        return serve_vision(opts, _serve)
    check_q4_decode(opts)
    if _tp_launch(opts):
        return
    if opts.tp > 1:
        _serve_tp(opts)
        return
    import signal

    lm = load(opts)
    draft = load_draft(opts, lm).model if opts.draft is not None else None
    adapters = _attach_loras(lm.model, opts.lora)
    engine, context = _serve_engine(opts, lm, adapters=adapters, draft=draft)
    # uvicorn re-raises a SIGTERM after its graceful shutdown; with the default handler that ends the
    # process before `serve` stops the engine. Unwinding as from Ctrl-C stops it and exits 0.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    note = "" if draft is None else (f", speculative decoding with draft {opts.draft} (k={engine.draft.num_draft}; "
                                     "rows with logprobs, penalties, logit_bias or structured outputs decode without it)")
    _serve(opts, lm, engine, context, adapters=adapters, note=note)


def _serve_engine(opts, lm, *, adapters=None, mirror=None, draft=None):
    """The engine `herd serve` runs, and its context per slot; every rank of --tp builds the same one."""
    from herd.serve.engine import Engine

    # The cache holds max_batch full contexts: cap the default at 8K (a 3.1 model's 128K x 8 slots
    # would not fit); --max-seq-len sets it explicitly.
    context = opts.max_seq_len or min(lm.model.args.max_seq_len, 8192)
    engine = Engine(lm.model, max_batch=opts.max_batch, max_queue=opts.max_queue, max_seq_len=context,
                    prefill_budget=opts.prefill_chunk, block_size=opts.block_size, num_blocks=opts.kv_blocks,
                    prefix_caching=not opts.no_prefix_caching, token_bytes=lm.tokenizer.decode_single_token_bytes,
                    compile=opts.compile, adapters=adapters, mirror=mirror, draft=draft,
                    num_draft=4 if opts.draft_k is None else opts.draft_k)
    if getattr(opts, "q4_decode", "never") != "never" and mirror is None:
        attach_q4_twin(opts, lm, engine)
    return engine, context


def _serve(opts, lm, engine, context: int, *, adapters=None, note: str = "") -> None:
    from herd.serve.server import serve

    tok = lm.tokenizer
    name = opts.model_name or Path(opts.path).resolve().name
    if adapters is not None and name in adapters:
        raise ValueError(f"--lora {name}=... has the base model's name; rename the adapter or pass --model-name")
    blocks = f"{engine.pool.num_blocks} KV blocks of {opts.block_size} ({engine.store.nbytes() / 2**30:.2f} GiB)" + (
        "" if opts.no_prefix_caching else " with prefix caching")
    print(f"herd serve: model {name!r} at http://{opts.host}:{opts.port}/v1, {opts.max_batch} slots x {context} "
          f"tokens, {blocks}, queue {opts.max_queue}{', API key required' if opts.api_key else ''}{note}",
          file=sys.stderr)
    if adapters is not None:
        print(f"herd serve: LoRA adapters {', '.join(adapters.names)} (pick one with the request's model)",
              file=sys.stderr)
    try:
        chat = lm.chat
    except ValueError as e:  # a base model without a template still serves /v1/completions
        chat = None
        print(f"herd serve: no chat format ({e}); /v1/chat/completions will answer 400", file=sys.stderr)
    serve(engine, tok, model_name=name, host=opts.host, port=opts.port, api_key=opts.api_key, chat=chat,
          body_timeout=opts.body_timeout)
    print("herd serve: stopped", file=sys.stderr)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _serve_tp(opts) -> None:
    """One rank of `herd serve --tp N` under torchrun: rank 0 serves and schedules, the others replay
    its step plans on their shards (see herd.serve.tp) until it tells them to stop."""
    import os
    import signal

    import torch.distributed as dist

    from herd.serve.tp import Follower, Leader, broadcast_receiver, broadcast_sender

    if int(os.environ.get("RANK", "0")) != 0:
        # Rank 0 decides when the followers stop (after its last step), however the server is
        # stopped, even while they still load; if rank 0 dies instead, their next collective fails
        # or torchrun SIGKILLs them (30 s after its SIGTERM).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        lm, tp = _load_tp(opts)
        device = lm.model.tok_embeddings.weight.device
        if tp.rank == 0:
            leader = Leader(broadcast_sender(device, tp.group))
            # uvicorn re-raises a SIGTERM after its graceful shutdown, which would end the process
            # before `engine.stop()` tells the followers; unwinding as from Ctrl-C runs it.
            signal.signal(signal.SIGTERM, _raise_interrupt)
            engine, context = _serve_engine(opts, lm, mirror=leader)
            try:
                _serve(opts, lm, engine, context,
                       note=f", tensor-parallel over {tp.size} ranks (rank 0: pid {os.getpid()})")
            except KeyboardInterrupt:
                if not leader.aborted:
                    raise
            finally:  # whatever ended it (even before the server started), the followers are told
                engine.stop()
            if leader.aborted:
                print("herd serve: a tensor-parallel step failed (logged above); exiting so torchrun stops every "
                      "rank", file=sys.stderr)
                raise SystemExit(1)
        else:
            engine, _ = _serve_engine(opts, lm)  # the same rows and blocks as rank 0's; no thread
            follower = Follower(engine.model, engine.cache, engine.store)
            follower.run(broadcast_receiver(device, tp.group))
            print(f"herd serve: rank {tp.rank} stopped by rank 0 after {follower.forwards} forwards", file=sys.stderr)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- arguments -----------------------------------------------------------------------------------


def _info_args(p):
    p.add_argument("path", help=CHECKPOINT_HELP)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _chat_args(p):
    add_checkpoint_args(p)
    add_sampling_args(p)
    p.add_argument("--image", action="append", metavar="FILE",
                   help="an image to talk about (repeatable; a Llama 3.2 Vision checkpoint): with generate the "
                   "prompt's, with chat the first message's; image tokens go before the text")


def _generate_args(p):
    _chat_args(p)
    p.add_argument("--prompt", action="append", help="repeat for a batch of prompts")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the 3.1 chat format")
    p.add_argument("--logprobs", action="store_true", help="print per-token log-probabilities")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end_of_text / eot / eom")
    p.add_argument("--lora", metavar="PATH", help="generate with this LoRA adapter (PEFT layout directory)")
    p.add_argument("--json-schema", metavar="FILE",
                   help="constrain the output to JSON valid under this JSON Schema (printed without the prompt)")
    b = p.add_argument_group("batch mode", "a JSONL file of prompts through the continuous-batching engine; "
                             "rerunning resumes (ids already in --output are skipped)")
    b.add_argument("--input", help='JSONL, one {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]} per '
                   "line, optionally with max_tokens, temperature, top_p, top_k, n, seed, stop, metadata")
    b.add_argument("--output", help="JSONL of results, one line per id, appended as each finishes")
    b.add_argument("--max-batch", type=int, help="sequences decoded together, KV cache rows (default 8)")
    b.add_argument("--n", type=int, help="choices per prompt unless a line sets n (default 1)")
    b.add_argument("--stop", action="append", help="stop string unless a line sets stop (repeatable)")
    b.add_argument("--nproc", type=int, help="data-parallel worker processes, each with its own model (on cuda:i "
                   "with --device cuda); their part files are merged into --output")
    b.add_argument("--strict", action="store_true", help="stop at the first bad input line instead of skipping it")
    b.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming an existing --output")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks: starts N processes (gloo on CPU, NCCL "
                   "on GPUs, one GPU each) that each load only their slice of the weights")
    p.add_argument("--draft", metavar="PATH", help="speculative decoding: this smaller checkpoint (same tokenizer) "
                   "proposes tokens that the model checks in one forward; greedy output is unchanged, sampled output "
                   "keeps the model's distribution")
    p.add_argument("--draft-k", type=int, metavar="N", help="tokens the draft proposes per model forward (default 4)")


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


def _serve_args(p):
    # vLLM's spellings (--max-model-len, --max-num-seqs, --served-model-name) are accepted as aliases,
    # so a launch script written for vLLM runs unchanged on these flags.
    add_checkpoint_args(p, context_help="context per slot (default: the model's, at most 8192)",
                        context_aliases=("--max-model-len",))
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the /v1 routes")
    p.add_argument("--max-batch", "--max-num-seqs", dest="max_batch", type=int, default=8,
                   help="sequences decoded together (KV cache rows)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 503")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block, the unit of prefix sharing")
    p.add_argument("--kv-blocks", type=int, help="KV blocks in the pool (default: every slot's whole context); fewer "
                   "blocks pause sequences when they run out")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="prefill every prompt whole (default: reuse the KV blocks of earlier prompts' shared prefixes)")
    p.add_argument("--q4-decode", choices=("auto", "always", "never"), default="auto",
                   help="for a .gguf of Q4_0/Q4_1 layers: also hold its int4 blocks (the same weights) and decode "
                   "each batch size on whichever of int4 and fp32 was faster at start-up (auto), always on int4, or "
                   "never (fp32 only, the file dequantized); prefill runs fp32")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens prefilled per step beside the running decodes (longer prompts take several steps)")
    p.add_argument("--model-name", "--served-model-name", dest="model_name",
                   help="the model id clients use (default: the checkpoint directory's name)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (for GPUs; slower on CPU)")
    p.add_argument("--body-timeout", type=float, default=60.0,
                   help="seconds a client has to send a whole request body; slower ones get 408")
    p.add_argument("--lora", action="append", metavar="NAME=PATH",
                   help="serve this LoRA adapter (PEFT layout directory) as model NAME; repeatable")
    p.add_argument("--draft", metavar="PATH", help="speculative decoding: this smaller checkpoint (same tokenizer) "
                   "proposes tokens that the model checks in one batched forward")
    p.add_argument("--draft-k", type=int, metavar="N", help="tokens the draft proposes per row and step (default 4)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks: starts N processes (gloo on CPU, NCCL "
                   "on GPUs, one GPU each), each holding a slice of the weights and KV heads; rank 0 serves")
    p.add_argument("--max-images", type=int, default=4, help="images per chat request (a Llama 3.2 Vision "
                   "checkpoint; each is encoded once and its cross-attention keys/values kept for the request)")


COMMANDS = {
    "info": (cmd_info, "describe a checkpoint: format, shapes, dtype, size", _info_args),
    "generate": (cmd_generate, "complete prompts (streamed), or a JSONL file of them (--input, batch mode)",
                 _generate_args),
    "chat": (cmd_chat, "interactive chat with history, /reset, Ctrl-D to quit", _chat_args),
    "tokenize": (cmd_tokenize, "encode or decode text with a tiktoken tokenizer", _tokenize_args),
    "serve": (cmd_serve, "OpenAI-compatible HTTP server with continuous batching", _serve_args),
}
