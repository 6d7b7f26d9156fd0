"""Tokenizers behind one interface (Llama 3's exact tiktoken one, HF tokenizer.json / GGUF vocabularies,
SentencePiece), Meta's Llama 3 chat formats and checkpoints' own jinja2 chat templates."""

from herd.tokenizer.base import TokenizerLike
from herd.tokenizer.chat import ChatFormat, ChatTokens, Message, ToolCall, llama31_system_prompt
from herd.tokenizer.hf import HFTokenizer
from herd.tokenizer.resolve import chat_format_for, load_tokenizer, read_chat_template, tokenizer_from_path
from herd.tokenizer.spm import SentencePieceTokenizer
from herd.tokenizer.template import ChatTemplate
from herd.tokenizer.tokenizer import StreamDecoder, Tokenizer, llama3_tokenizer_path

__all__ = [
    "ChatFormat",
    "ChatTemplate",
    "ChatTokens",
    "HFTokenizer",
    "Message",
    "SentencePieceTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerLike",
    "ToolCall",
    "chat_format_for",
    "llama31_system_prompt",
    "llama3_tokenizer_path",
    "load_tokenizer",
    "read_chat_template",
    "tokenizer_from_path",
]
