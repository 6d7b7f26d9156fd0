"""`herd serve` on a Llama 3.2 Vision checkpoint: the same server, a `VisionEngine` behind it."""

from __future__ import annotations

import sys


def serve_vision(opts, serve) -> None:
    """Load the checkpoint (HF mllama or Meta layout) and serve it; `serve` is the text path's
    `_serve` (banner, chat format, uvicorn), shared so both paths print and listen alike."""
    from herd.generate.vision import load_vision_for_inference
    from herd.serve.vision import VisionEngine

    for flag, bad in (("--lora", opts.lora), ("--draft", opts.draft), ("--compile", opts.compile),
                      ("--tp", opts.tp != 1)):
        if bad:
            raise ValueError(f"{flag} is not supported for a Llama 3.2 Vision checkpoint yet; leave it out")
    if opts.max_images < 1:
        raise ValueError(f"--max-images must be at least 1, got {opts.max_images}")
    lm = load_vision_for_inference(opts.path, tokenizer=opts.tokenizer, dtype=opts.dtype, device=opts.device)
    text = lm.model.args.text
    context = opts.max_seq_len or min(text.max_seq_len, 8192)
    if context > text.max_seq_len:
        raise ValueError(f"--max-seq-len {context} is beyond the model's context of {text.max_seq_len} tokens")
    engine = VisionEngine(lm.model, max_batch=opts.max_batch, max_queue=opts.max_queue, max_seq_len=context,
                          prefill_budget=opts.prefill_chunk, block_size=opts.block_size, num_blocks=opts.kv_blocks,
                          prefix_caching=not opts.no_prefix_caching,
                          token_bytes=lm.tokenizer.decode_single_token_bytes, max_images=opts.max_images)
    print(f"herd serve: Llama 3.2 Vision, image_url parts (data URLs) up to {opts.max_images} per request, "
          f"{lm.model.args.vision.max_num_tiles} tiles of {lm.model.args.vision.image_size} px each", file=sys.stderr)
    serve(opts, lm, engine, context)
