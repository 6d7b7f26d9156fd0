"""Perplexity and bits per byte of a model on a text, with a sliding window.

A text longer than the context is scored in windows of `seq_len` input tokens that start every
`stride` tokens; each window scores only the tokens no earlier window scored, so every token
after the first is scored exactly once, with at least `seq_len - stride` tokens of context once
the first window is past. stride == seq_len is the cheapest (disjoint windows, tokens at the
start of a window see little context); a smaller stride costs seq_len / stride more forwards
and approaches the model's true per-token loss.

Bits per byte (total loss in bits / UTF-8 bytes of the text) is comparable across tokenizers;
perplexity is not. `compare_schemes` runs the same text through the float model and each
quantization scheme: the quality cost of quantization is measured, not assumed.

This module imports nothing else from herd.eval, so other evaluations can grow beside it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from herd.model.llama import Transformer

_HEAD_CHUNK = 256  # positions per output-head matmul: caps the (chunk, vocab) fp32 logits


@dataclass(frozen=True)
class PerplexityResult:
    """perplexity = exp(nll); nll is the mean negative log-likelihood (nats) per scored token."""

    perplexity: float
    nll: float
    num_tokens: int  # tokens scored (all but the first)
    num_windows: int
    num_bytes: int | None = None  # UTF-8 bytes of the text, when known
    bits_per_byte: float | None = None


@torch.inference_mode()
def _window_nll(model: Transformer, window: torch.Tensor, first_scored: int) -> tuple[float, int]:
    """Sum of -log p(window[t] | window[:t]) for t >= first_scored, and how many terms."""
    h = model.hidden(window[None, :-1])[0]  # (S-1, dim); position t predicts window[t + 1]
    targets = window[1:]
    total, count = 0.0, 0
    for start in range(max(first_scored - 1, 0), h.shape[0], _HEAD_CHUNK):
        logits = model.output(h[start:start + _HEAD_CHUNK]).float()  # (chunk, V)
        tgt = targets[start:start + _HEAD_CHUNK]
        nll = torch.logsumexp(logits, dim=-1) - logits.gather(-1, tgt[:, None]).squeeze(-1)
        total += float(nll.double().sum())
        count += tgt.numel()
    return total, count


def perplexity(
    model: Transformer,
    tokens: Sequence[int] | torch.Tensor | str,
    *,
    seq_len: int,
    stride: int | None = None,
    tokenizer=None,
    num_bytes: int | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on `tokens` (ids), or on a text (then `tokenizer` is required).

    A text is encoded with BOS (so its first real token is scored too) and its UTF-8 length
    gives bits per byte; for ids, pass `num_bytes` to get it. seq_len: window length (at most
    the model's max_seq_len); stride: window step, default seq_len (disjoint windows).
    """
    if isinstance(tokens, str):
        if tokenizer is None:
            raise ValueError("perplexity of a text needs tokenizer=...; or pass token ids")
        bos = getattr(tokenizer, "add_bos", True)
        text, tokens = tokens, tokenizer.encode(tokens, bos=bos, eos=False)
        # Bytes of the scored text: all of it after a BOS, else all but the unscored first token's.
        num_bytes = len((text if bos else tokenizer.decode(tokens[1:])).encode("utf-8"))
    ids = torch.as_tensor(tokens, dtype=torch.long).flatten()
    stride = seq_len if stride is None else stride
    if seq_len < 2 or seq_len > model.args.max_seq_len:
        raise ValueError(f"seq_len must be in 2..{model.args.max_seq_len} (the model's max_seq_len), got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {ids.numel()}")
    if int(ids.min()) < 0 or int(ids.max()) >= model.args.vocab_size:
        raise ValueError(f"token ids must be in 0..{model.args.vocab_size - 1}; is the tokenizer the model's?")
    ids = ids.to(model.tok_embeddings.weight.device)

    total, count, windows = 0.0, 0, 0
    scored_to = 0  # tokens [0, scored_to] are done (token 0 has no context and is never scored)
    for begin in range(0, ids.numel() - 1, stride):
        # seq_len inputs and the seq_len targets they predict: seq_len + 1 tokens, so disjoint
        # windows (stride == seq_len) still score the token at each boundary.
        end = min(begin + seq_len + 1, ids.numel())
        s, n = _window_nll(model, ids[begin:end], first_scored=scored_to + 1 - begin)
        total, count, windows = total + s, count + n, windows + 1
        scored_to = end - 1
        if end == ids.numel():
            break
    assert count == ids.numel() - 1, "every token after the first is scored exactly once"
    nll = total / count
    bpb = total / math.log(2) / num_bytes if num_bytes else None
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, num_tokens=count, num_windows=windows,
                            num_bytes=num_bytes, bits_per_byte=bpb)


@dataclass(frozen=True)
class SchemeResult:
    """One row of `compare_schemes`: the float model ("none") or a quantization scheme."""

    scheme: str
    result: PerplexityResult
    delta_perplexity: float | None  # relative to the first row (the float model): ppl / ppl_0 - 1


def compare_schemes(
    path: str | os.PathLike,
    text: str,
    *,
    schemes: Sequence[str] = (),
    seq_len: int,
    stride: int | None = None,
    max_tokens: int | None = None,
    group_size: int = 32,
    head: str | None = None,
    tokenizer_path: str | os.PathLike | None = None,
) -> list[SchemeResult]:
    """Perplexity of the checkpoint at `path`, then of each scheme applied to it, on `text`.

    A quantized checkpoint (from `herd quantize`) is evaluated as it is and cannot be combined
    with `schemes`. max_tokens truncates the encoded text (bits per byte then counts the bytes
    of the kept tokens). Each scheme quantizes a fresh fp32 load, so rows do not interact.
    """
    from herd.generate.loading import load_for_inference
    from herd.quant import QuantConfig, is_quantized_checkpoint, quantize

    quantized = is_quantized_checkpoint(path)
    if quantized and schemes:
        raise ValueError(f"{path} is already quantized; compare schemes on the float checkpoint it came from")
    # Validate before the slow part. head None: each scheme's default (int8 head for int8/int4, float for fp8).
    configs = [QuantConfig(s, group_size=group_size, head=head) for s in schemes]
    loaded = load_for_inference(path, tokenizer=tokenizer_path, dtype=None if quantized else torch.float32,
                                cpu_kernels=False)
    model, tokenizer = loaded.model, loaded.tokenizer

    def load() -> Transformer:
        return load_for_inference(path, dtype=torch.float32, cpu_kernels=False).model

    ids = tokenizer.encode(text, bos=tokenizer.add_bos, eos=False)
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        ids = ids[:max_tokens]
    # The first token is never scored (BOS, or the text's first token when the tokenizer adds no BOS).
    num_bytes = len(tokenizer.decode(ids[1:]).encode("utf-8"))
    seq_len = min(seq_len, model.args.max_seq_len)

    rows: list[SchemeResult] = []
    for name, config in [("none" if not quantized else "checkpoint", None), *zip(schemes, configs)]:
        if config is not None:
            model = load()
            quantize(model, config)
        result = perplexity(model, ids, seq_len=seq_len, stride=stride, num_bytes=num_bytes)
        base = rows[0].result.perplexity if rows else None
        rows.append(SchemeResult(scheme=name, result=result,
                                 delta_perplexity=None if base is None else result.perplexity / base - 1))
    return rows


def held_out_wiki_text(lang: str = "en", *, val_fraction: float = 0.01) -> tuple[str, int]:
    """The Wikipedia lead paragraphs on the validation side of herd's document split, joined by
    blank lines, and how many there are: text the trainer (same val_fraction) never saw."""
    from herd.data.corpora import wikipedia_leads
    from herd.data.split import select_split

    docs = [d.text for d in select_split(wikipedia_leads(lang), "val", val_fraction=val_fraction)]
    if not docs:
        raise ValueError(f"val_fraction {val_fraction} selects no Wikipedia article; use a larger fraction")
    return "\n\n".join(docs), len(docs)

