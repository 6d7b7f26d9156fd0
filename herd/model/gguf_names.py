"""GGUF tensor names and the `gguf` package, shared by the GGUF reader (`gguf.py`) and writer
(`gguf_write.py`): llama.cpp's `blk.N.attn_q.weight` <-> herd's (Meta's) `layers.N.attention.wq.weight`.

A module of its own so that the reader can re-export the writer (every `herd.model.gguf` import
keeps working) without the two importing each other.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

ARCH = "llama"
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1 RoPE scaling as per-pair divisors (see gguf.py)


# GGUF tensor name -> herd/Meta name; "{}" is the block (layer) index.
_NAMES: dict[str, str] = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.attn_q.weight": "layers.{}.attention.wq.weight",
    "blk.{}.attn_k.weight": "layers.{}.attention.wk.weight",
    "blk.{}.attn_v.weight": "layers.{}.attention.wv.weight",
    "blk.{}.attn_output.weight": "layers.{}.attention.wo.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.feed_forward.w1.weight",
    "blk.{}.ffn_down.weight": "layers.{}.feed_forward.w2.weight",
    "blk.{}.ffn_up.weight": "layers.{}.feed_forward.w3.weight",
}
_NAMES_INV = {herd: g for g, herd in _NAMES.items()}
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.")
_HERD_LAYER = re.compile(r"^layers\.(\d+)\.")


def _rename(name: str, pattern: re.Pattern[str], prefix: str, table: Mapping[str, str]) -> str | None:
    m = pattern.match(name)
    template = f"{prefix}.{{}}.{name[m.end():]}" if m else name
    out = table.get(template)
    return None if out is None else (out.format(m.group(1)) if m else out)


def herd_name(gguf_name: str) -> str | None:
    """herd/Meta parameter name of a GGUF tensor name, or None for a tensor herd does not know."""
    return _rename(gguf_name, _GGUF_BLOCK, "blk", _NAMES)


def gguf_name(herd_key: str) -> str:
    """GGUF tensor name of a herd/Meta parameter name."""
    out = _rename(herd_key, _HERD_LAYER, "layers", _NAMES_INV)
    if out is None:
        raise ValueError(f"{herd_key!r} is not a Llama parameter name (expected e.g. 'layers.0.attention.wq.weight')")
    return out


def gguf_package():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("GGUF files need the `gguf` package (llama.cpp's own): pip install 'herd[models]'") from e
    return gguf


__all__ = ["ARCH", "ROPE_FREQS", "gguf_name", "gguf_package", "herd_name"]
