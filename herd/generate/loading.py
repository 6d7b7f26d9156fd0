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

from herd.generate.fast_decode import apply_fast_decode
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
