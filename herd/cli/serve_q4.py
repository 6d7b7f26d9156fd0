"""`herd serve --q4-decode`: a Q4 GGUF file's int4 blocks beside its fp32 dequantization (see
`herd.serve.decode_choice`). Split from inference.py, which keeps the serve command's flow."""

from __future__ import annotations

import sys


def check_q4_decode(opts) -> None:
    """Before loading: --q4-decode auto quietly steps aside where a twin cannot apply (not a GGUF,
    not CPU fp32, or with --compile, --lora, --draft, --tp); "always" says why instead."""
    unfit = (f"{opts.path} is not a .gguf file" if not str(opts.path).endswith(".gguf") else
             "it needs CPU, fp32 and no --compile, --lora, --draft or --tp" if (
                 opts.compile or opts.lora or opts.draft is not None or opts.tp != 1 or str(opts.device) != "cpu"
                 or str(opts.dtype) != "torch.float32") else None)
    if unfit and opts.q4_decode == "always":
        raise ValueError(f"--q4-decode always decodes with a GGUF file's Q4_0/Q4_1 blocks, but {unfit}; "
                         "pass --q4-decode never")
    opts.q4_decode = "never" if unfit else opts.q4_decode


def attach_q4_twin(opts, lm, engine) -> None:
    """Hold the GGUF file's int4 blocks beside the fp32 weights; decode each batch size on the faster
    of the two (--q4-decode auto) or always on the int4 blocks (always)."""
    from herd.generate.loading import q4_decode_twin
    from herd.serve.decode_choice import choose_decode

    twin, why = q4_decode_twin(lm.model, opts.path)
    if twin is None:
        if opts.q4_decode == "always":
            raise ValueError(f"--q4-decode always: {why}; pass --q4-decode never")
        print(f"herd serve: decoding with the fp32 weights only ({why})", file=sys.stderr)
        return
    engine.decode_choice = choose_decode({"fp32": lm.model, "int4": twin}, engine.cache, mode=opts.q4_decode)
    print(f"herd serve: {why}; decode steps by batch size: {engine.decode_choice.describe()}", file=sys.stderr)
