"""A multi-turn chat over the generation loop, and finding the tokenizer that goes with a model.

The session keeps the conversation as `Message`s and re-encodes the whole dialog each turn
(prefill is cheap next to decoding at these sizes, and it keeps the cache logic in one place:
`generate`). Replies stream as text; the finished reply is parsed back with the chat format, so
tool calls come back as `ToolCall`s rather than raw text.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

from herd.generate.generate import stream_text
from herd.generate.sampling import SamplingParams
from herd.model.llama import Transformer
from herd.tokenizer import ChatFormat, ChatTemplate, Message, Tokenizer, TokenizerLike
from herd.tokenizer.resolve import load_tokenizer


def resolve_tokenizer(model_dir: str | Path, explicit: str | Path | None, *, vocab_size: int) -> TokenizerLike:
    """The tokenizer for a checkpoint; see herd.tokenizer.resolve.load_tokenizer (kept for callers)."""
    return load_tokenizer(model_dir, explicit, vocab_size=vocab_size)


class ChatSession:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        chat: ChatFormat | ChatTemplate | None = None,
        version: str = "3.1",
        system: str | None = None,
        sampling: SamplingParams = SamplingParams(),
        max_new_tokens: int = 512,
    ):
        """chat: the checkpoint's chat format (`LoadedModel.chat`); None means Meta's Llama 3
        ChatFormat of `version` on this tokenizer."""
        self.model, self.tokenizer = model, tokenizer
        self.format = chat if chat is not None else ChatFormat(tokenizer, version=version)
        self.system, self.sampling, self.max_new_tokens = system, sampling, max_new_tokens
        self.history: list[Message] = []
        self.last_reply: Message | None = None
        self.reset()

    def reset(self) -> None:
        self.history = [Message(role="system", content=self.system)] if self.system else []

    def send(self, text: str) -> Iterator[str]:
        """Add a user turn and stream the assistant's reply as text pieces.

        The reply joins the history once it is complete (a reply cut short by an exception is
        dropped with its user turn, so the history never holds half a turn).
        """
        dialog = [*self.history, Message(role="user", content=text)]
        prompt = self.format.encode_dialog_prompt(dialog).tokens
        room = self.model.args.max_seq_len - len(prompt)
        if room < 1:
            raise ValueError(
                f"the conversation is {len(prompt)} tokens, the model's limit is {self.model.args.max_seq_len}; "
                "start over with /reset"
            )
        events = stream_text(
            self.model, self.tokenizer, [prompt], max_new_tokens=min(self.max_new_tokens, room),
            sampling=self.sampling, stop_tokens=self.tokenizer.stop_tokens,
        )
        reply = yield from stream_reply(events, self.format)
        self.history = [*dialog, reply]
        self.last_reply = reply


def stream_reply(events, fmt) -> Generator[str, None, Message]:
    """Yield one row's text pieces from `stream_text` events; return the finished reply parsed by
    the chat format (its stop token included, so <|eom_id|> and tool calls come back)."""
    while True:
        try:
            event = next(events)
        except StopIteration as done:
            result = done.value[0]
            break
        if event.texts[0]:
            yield event.texts[0]
    return fmt.decode_assistant_message(result.tokens + ([result.stop_token] if result.stop_token is not None else []))
