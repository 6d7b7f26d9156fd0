"""`--draft` for `herd generate` and `herd serve`: opening a draft checkpoint that shares the model's
tokenizer, and speculative generation from the command line (`herd.generate.speculative`)."""

from __future__ import annotations

import sys


def check_draft_flags(opts) -> None:
    """`--draft` with what it supports, before any checkpoint is read."""
    if opts.draft is None:
        if opts.draft_k is not None:
            raise ValueError("--draft-k sets how many tokens the draft proposes; it needs --draft PATH")
        return
    if opts.draft_k is not None and opts.draft_k < 1:
        raise ValueError(f"--draft-k must be at least 1 (tokens the draft proposes per target forward), "
                         f"got {opts.draft_k}")
    for flag, bad in (("--tp", opts.tp != 1), ("--lora", opts.lora), ("--json-schema", opts.json_schema),
                      ("--logprobs", opts.logprobs)):
        if bad:
            raise ValueError(f"--draft (speculative decoding) does not support {flag} yet; leave out one of them")


def load_draft(opts, lm):
    """The --draft checkpoint, opened like the model, refused unless it shares the model's vocabulary."""
    from herd.generate.loading import load_for_inference
    from herd.model.formats import describe

    size, want = describe(opts.draft).args.vocab_size, lm.model.args.vocab_size
    if size != want:  # before its weights and tokenizer are read
        raise ValueError(f"--draft {opts.draft}: its vocabulary has {size} entries but the model's has {want}; a "
                         "draft must use the model's tokenizer (e.g. a smaller model of the same family)")
    draft = load_for_inference(opts.draft, tokenizer=opts.tokenizer, dtype=opts.dtype, device=opts.device,
                               max_seq_len=opts.max_seq_len)
    check_same_vocabulary(lm, draft, flag="--draft")
    return draft


def check_same_vocabulary(lm, draft, *, flag: str) -> None:
    """A draft proposes token ids the model must read as the same text: same vocabulary size and the
    same bytes for every token id (special tokens included)."""
    a, b = lm.model.args.vocab_size, draft.model.args.vocab_size
    if a != b:
        raise ValueError(f"{flag} {draft.path}: its vocabulary has {b} entries but the model's has {a}; a draft must "
                         "use the model's tokenizer (e.g. a smaller model of the same family)")
    ta, tb = lm.tokenizer, draft.tokenizer

    def token(tok, i: int) -> bytes | None:
        try:
            return tok.decode_single_token_bytes(i)
        except (KeyError, ValueError, IndexError):
            return None

    if ta.n_words != tb.n_words or any(token(ta, i) != token(tb, i) for i in range(ta.n_words)):
        raise ValueError(f"{flag} {draft.path}: its tokenizer differs from the model's ({tb.n_words} vs "
                         f"{ta.n_words} tokens, or different token texts); a draft must use the model's tokenizer")


def generate_speculative(opts, lm, draft, params) -> None:
    """`herd generate --draft`: the draft proposes --draft-k tokens, the model checks them in one forward."""
    from herd.generate.speculative import speculative_tokens
    from herd.tokenizer import StreamDecoder

    tok = lm.tokenizer
    if opts.chat:
        if len(opts.prompt) > 1:
            raise ValueError("--chat takes one --prompt (one user turn); use `herd chat` for a conversation")
        prompts = [lm.encode_user_turn(opts.prompt[0], system=opts.system)]
    else:
        prompts = [lm.encode_text(p) for p in opts.prompt]
    stop = lm.stop_tokens if not opts.ignore_eos else ()
    k = 4 if opts.draft_k is None else opts.draft_k
    events = speculative_tokens(lm.model, draft.model, prompts, max_new_tokens=opts.max_new_tokens, num_draft=k,
                                sampling=params, stop_tokens=stop)
    single = len(prompts) == 1  # a single prompt is streamed, a round's tokens at a time
    decoders = [StreamDecoder(tok) for _ in prompts]
    if single:
        print(opts.prompt[0] if not opts.chat else "", end="", flush=True)
    while True:
        try:
            event = next(events)
        except StopIteration as done:
            results = done.value
            break
        if single:
            text = "".join(decoders[0].feed(t) for t in event.tokens[0])
            if event.finish_reasons[0] is not None:
                text += decoders[0].flush()
            print(text, end="", flush=True)
    if single:
        print()
    else:
        for p, r in zip(opts.prompt, results):
            print(f"--- {p!r}\n{p}{tok.decode(r.tokens)}")
    for r in results:
        print(f"[{len(r.tokens)} tokens, finish: {r.finish_reason}]", file=sys.stderr)
    drafted, accepted = sum(r.drafted for r in results), sum(r.accepted for r in results)
    forwards, produced = sum(r.target_forwards for r in results), sum(len(r.tokens) for r in results)
    rate = f"{accepted / drafted:.1%}" if drafted else "n/a"
    print(f"[speculative: {accepted}/{drafted} draft tokens accepted ({rate}), k={k}, {forwards} target forwards "
          f"for {produced} tokens]", file=sys.stderr)
