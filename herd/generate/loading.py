"""One way to open a checkpoint for inference: the model, its tokenizer and its chat format.

`herd generate`, `chat`, `serve`, `eval` and the post-training stages all start from a path a
user typed: an HF or Meta directory, a `.gguf` file, or a directory `herd quantize` wrote. This
module is the one place that turns such a path into what they need, so every command accepts the
same inputs and picks the same tokenizer, chat format and stop tokens:

* weights: `herd.quant.load_quantized` for herd's quantized directories, `herd.model.load_model`
  for everything else (HF safetensors, Meta consolidated files of any model-parallel degree,
  GGUF, which is dequantized to float);
* tokenizer: `herd.tokenizer.load_tokenizer` (tiktoken for Llama 3 vocabularies wherever they
  come from, HF tokenizers, SentencePiece, GGUF vocabularies);
* chat: `herd.tokenizer.chat_format_for` (Meta's ChatFormat for Llama 3, else the checkpoint's
  own jinja template), resolved on first use, since plain-text generation needs no template and
  a checkpoint without one must still load.

Trade-off: generation depends on `herd.quant` here (nowhere else), because a quantized directory
is a checkpoint like any other to the person typing the path; quant never imports generate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from herd.generate.fast_decode import apply_fast_decode
from herd.kernels.hugepages import move_to_huge_pages
from herd.model.formats import load_model
from herd.model.llama import Transformer
from herd.quant import apply_cpu_kernels, is_quantized_checkpoint, load_quantized
from herd.tokenizer import ChatFormat, ChatTemplate, Message, TokenizerLike, chat_format_for, load_tokenizer


@dataclass
class LoadedModel:
    """A checkpoint opened for inference. `chat` is resolved on first access (ValueError when the
    checkpoint declares no chat template and its vocabulary is not Llama 3's)."""

    model: Transformer
    tokenizer: TokenizerLike
    path: Path
    _chat: ChatFormat | ChatTemplate | None = field(default=None, repr=False)

    @property
    def chat(self) -> ChatFormat | ChatTemplate:
        if self._chat is None:
            self._chat = chat_format_for(self.path, self.tokenizer)
        return self._chat

    @property
    def stop_tokens(self) -> tuple[int, ...]:
        """Every end-of-sequence / end-of-turn id the checkpoint declares."""
        return tuple(self.tokenizer.stop_tokens)

    def encode_text(self, text: str) -> list[int]:
        """A plain-text prompt, with BOS when the checkpoint's tokenizer adds one (Llama) and without
        it when it does not (SmolLM2's GGUF says add_bos_token = false)."""
        return self.tokenizer.encode(text, bos=self.tokenizer.add_bos, eos=False)

    def encode_user_turn(self, text: str, *, system: str | None = None) -> list[int]:
        """One user turn (after an optional system message) in the checkpoint's chat format, ending
        where the assistant's reply begins."""
        messages = [Message(role="system", content=system)] if system else []
        return self.chat.encode_dialog_prompt([*messages, Message(role="user", content=text)]).tokens


def load_for_inference(
    path: str | os.PathLike[str],
    *,
    tokenizer: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    max_seq_len: int | None = None,
    cpu_kernels: bool = True,
    train: bool = False,
) -> LoadedModel:
    """Open the checkpoint at `path` (directory or .gguf file).

    dtype: None means fp32 on CPU (bf16 matmuls are very slow on CPUs without AVX-512 BF16) and
        the checkpoint's own dtype elsewhere. tokenizer: a tokenizer file or directory overriding
        the one the checkpoint declares. cpu_kernels: route CPU decode GEMVs through herd's kernels
        and each decode step's blocks through the fused op (inference only; ignored with
        train=True). train: return the model in train mode.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; pass a checkpoint directory "
                                "(HF, Meta or herd quantize output) or a .gguf file")
    on_cpu = torch.device(device).type == "cpu"
    if dtype is None and on_cpu:
        dtype = torch.float32
    if is_quantized_checkpoint(path):
        model = load_quantized(path, dtype=dtype, device=device, max_seq_len=max_seq_len)
    else:
        model = load_model(path, dtype=dtype, device=device, max_seq_len=max_seq_len)
    if train:
        model.train()
    else:
        model.eval()
        if on_cpu and cpu_kernels:
            apply_cpu_kernels(model)  # fp32 decode GEMVs through herd's kernel (MKL's sgemv is slower)
            apply_fast_decode(model)  # each decode step's block as one fused op (small models: 1.5-2x)
    tok = load_tokenizer(path, tokenizer, vocab_size=model.args.vocab_size)
    return LoadedModel(model=model, tokenizer=tok, path=path)


def q4_decode_twin(model: Transformer, path: str | os.PathLike[str]) -> tuple[Transformer | None, str]:
    """The same model with the GGUF file's Q4_0 / Q4_1 blocks kept as int4 linears, for decoding.

    `model` is the file loaded by `load_for_inference` (every weight dequantized to fp32). The twin
    shares its embedding, norms and output head (the float values, Q8_0 heads included) and holds
    every layer's seven linears as the file's int4 blocks, which dequantize to exactly `model`'s
    fp32 weights: both compute the same function, up to fp32 rounding order, and a serving engine
    may decode any step with either (`herd.serve.decode_choice`). Returns (None, why) when the file
    is not a GGUF or not every layer linear is Q4_0 / Q4_1 (a twin would then be another model).
    """
    from herd.quant import QuantConfig
    from herd.quant.gguf_blocks import quantized_model_from_gguf

    path = Path(path).expanduser()
    if path.suffix != ".gguf":
        return None, f"{path.name} is not a GGUF file"
    built = quantized_model_from_gguf(path, QuantConfig("int4", group_size=32, head="float"))
    layer_linears = {f"layers.{i}.{n}" for i in model.layers for n in
                     ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                      "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    missing = sorted(layer_linears - set(built.exact))
    if missing:
        return None, f"{len(missing)} layer linears are not Q4_0/Q4_1 in the file (e.g. {missing[0]})"
    twin = built.model.eval()
    apply_cpu_kernels(twin)  # repack the int4 blocks into the decode kernels' tiles
    apply_fast_decode(twin, huge_pages=False)  # the shared tensors were moved with `model` already
    twin.tok_embeddings, twin.output, twin.norm = model.tok_embeddings, model.output, model.norm
    for name, block in twin.layers.items():
        block.attention_norm, block.ffn_norm = model.layers[name].attention_norm, model.layers[name].ffn_norm
    twin.freqs_cis = model.freqs_cis
    move_to_huge_pages(nn.ModuleList([m for b in twin.layers.values() for m in (b.attention, b.feed_forward)]))
    kept = len(built.exact)
    del built
    _trim_heap()
    return twin, f"{kept} Q4 linears kept as int4"


def _trim_heap() -> None:
    """Give the heap's free pages back to the OS. Building the twin reads the whole GGUF file to
    fp32 once more (~0.5 GB for SmolLM2-135M) and frees it, but glibc keeps the pages: measured,
    the process's RSS stayed 0.5 GB higher (1.59 GB against 1.10 GB after `malloc_trim`). Other C
    libraries have no such call and keep what they keep."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
