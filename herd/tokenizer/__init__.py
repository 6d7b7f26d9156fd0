"""Llama 3 tokenizer (tiktoken engine, Meta's exact behaviour) and chat formats 3.0 / 3.1+."""

from herd.tokenizer.chat import ChatFormat, ChatTokens, Message, ToolCall, llama31_system_prompt
from herd.tokenizer.tokenizer import StreamDecoder, Tokenizer, llama3_tokenizer_path

__all__ = [
    "ChatFormat",
    "ChatTokens",
    "Message",
    "StreamDecoder",
    "Tokenizer",
    "ToolCall",
    "llama31_system_prompt",
    "llama3_tokenizer_path",
]
