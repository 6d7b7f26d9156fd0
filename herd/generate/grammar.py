"""Structured output: a JSON schema (or a Lark grammar) turned into per-token masks, as a logits processor.

The grammar engine is llguidance (Microsoft's, the one vLLM and llama.cpp also ship). It was
chosen over xgrammar on evidence measured here (docs/structured-outputs.md,
benchmarks/grammar_libs.py): a 3 MB wheel with no dependencies (xgrammar requires torch,
transformers and a 286 MB triton), every random walk through a schema valid on both Llama 3's
tiktoken vocabulary and SmolLM2's HF byte-level BPE (xgrammar let raw control characters into
JSON strings on the latter, and compiled `allOf` without enforcing it), and schema keywords it
cannot enforce are refused rather than silently ignored. Its masks cost ~0.1 ms per token for a
128K vocabulary, against xgrammar's ~0.02 ms: small beside a forward pass.

Trade-offs:
* The vocabulary is handed to llguidance as raw bytes from herd's own tokenizer
  (`decode_single_token_bytes`), whatever its engine, so the masks agree byte for byte with what
  herd decodes. Special tokens are marked special: their text (`<|eot_id|>`) can never be
  produced inside a JSON string; the only special tokens a grammar allows are the stop tokens,
  and only once the grammar is complete.
* The model's vocabulary may be larger than the tokenizer's (padded embeddings): the ids beyond
  the tokenizer are never allowed.
* JSON is generated compact (`", "` and `": "` separators, no free whitespace): with free
  whitespace a weak model can emit blanks until max_tokens, and the text is json.dumps'.
* A processor whose matcher reaches an error state (it never should: it only accepts tokens
  its own mask allowed) logs it and allows only the stop tokens, rather than raising on the
  engine thread, where an exception fails every running request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from herd.tokenizer.base import TokenizerLike

log = logging.getLogger(__name__)

# Compact JSON, like json.dumps's default separators.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
LLGUIDANCE_HINT = "structured output needs llguidance: pip install 'herd[serve]' (or pip install llguidance)"


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as e:
        raise ImportError(LLGUIDANCE_HINT) from e
    return llguidance


class GrammarCompiler:
    """One tokenizer's vocabulary as the grammar engine sees it (built once: ~0.4 s for 128K
    tokens), and the grammars compiled against it.

    vocab_size: the model's (rows of its logits), which may exceed the tokenizer's.
    stop_tokens: the ids a complete grammar allows (default: the tokenizer's stop tokens).
    """

    def __init__(self, tokenizer: TokenizerLike, vocab_size: int, *, stop_tokens: Sequence[int] | None = None):
        llg = _llguidance()
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.stop_tokens = tuple(tokenizer.stop_tokens if stop_tokens is None else stop_tokens)
        if not self.stop_tokens:
            raise ValueError("a grammar needs at least one stop token to end the output with")
        if any(not 0 <= t < vocab_size for t in self.stop_tokens):
            raise ValueError(f"stop tokens {list(self.stop_tokens)} must be ids of the model's vocabulary "
                             f"(0..{vocab_size - 1})")
        n = min(tokenizer.n_words, vocab_size)  # ids the model can emit and the tokenizer can decode
        special = sorted(t for t in tokenizer.special_tokens.values() if t < n)

        class _Vocabulary:  # the duck type llguidance.TokenizerWrapper reads
            eos_token_id = self.stop_tokens[0]
            bos_token_id = tokenizer.bos_id
            tokens = [tokenizer.decode_single_token_bytes(i) for i in range(n)]
            special_token_ids = special

            def __call__(self, text: bytes) -> list[int]:  # used by the engine to tokenize forced text
                return [t for t in tokenizer.encode(text.decode("utf-8", errors="replace"), bos=False, eos=False)
                        if t < n]

        self._llg = llg
        self._tok = llg.LLTokenizer(llg.TokenizerWrapper(_Vocabulary()), n_vocab=vocab_size,
                                    eos_token=list(self.stop_tokens))

    def json_schema(self, schema: dict[str, Any] | bool, *, strict: bool = True) -> Grammar:
        """A grammar for JSON documents that validate against `schema`.

        strict: refuse schemas with keywords the engine cannot enforce (uniqueItems, not,
        if/then/else); False ignores those keywords (OpenAI's `strict: false`: best effort).
        ValueError names the problem.
        """
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"a JSON schema must be an object (or true/false), got {type(schema).__name__}")
        try:
            source = self._llg.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), overrides={**JSON_OPTIONS, "lenient": not strict})
        except (ValueError, TypeError) as e:
            raise ValueError(f"invalid JSON schema: {e}") from e
        return self._grammar(source, "JSON schema")

    def lark(self, grammar: str) -> Grammar:
        """A grammar in llguidance's Lark dialect (`%json {...}` embeds a JSON schema)."""
        return self._grammar(self._llg.LLMatcher.grammar_from_lark(grammar), "grammar")

    def _grammar(self, source: str, what: str) -> Grammar:
        failed, messages = self._llg.LLMatcher.validate_grammar_with_warnings(source, self._tok)
        if failed:
            raise ValueError(f"invalid or unsupported {what}: {messages[0]}")
        matcher = self._llg.LLMatcher(self._tok, source, log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid or unsupported {what}: {matcher.get_error()}")
        return Grammar(self, matcher)

    @property
    def engine_vocab_size(self) -> int:
        """Ids the grammar engine knows (the tokenizer's, up to the model's size); the rest are never allowed."""
        return self._tok.vocab_size


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar; `processor()` is a `ProcessorFactory` (a fresh matcher per choice)."""

    compiler: GrammarCompiler
    _start: Any  # an LLMatcher in its initial state, copied for every choice

    def processor(self) -> GrammarProcessor:
        c = self.compiler
        return GrammarProcessor(self._start.deep_copy(), c.vocab_size, c.stop_tokens, known=c.engine_vocab_size)


class GrammarProcessor:
    """Masks one choice's logits to the tokens its grammar allows next (see `herd.generate.processors`)."""

    def __init__(self, matcher: Any, vocab_size: int, stop_tokens: Sequence[int], *, known: int):
        self.matcher, self.vocab_size, self._known = matcher, vocab_size, known
        self._stop = np.array(list(stop_tokens), dtype=np.int64)
        self._words = np.zeros((known + 31) // 32, dtype=np.int32)  # one bit per id the engine knows
        self.failed: str | None = None

    def _bits(self) -> np.ndarray:
        """(V,) uint8, 1 where the grammar allows the token next; ids the engine does not know stay 0."""
        out = np.zeros(self.vocab_size, dtype=np.uint8)
        if self.failed is None:
            self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
            if self.matcher.is_error():
                self._fail(self.matcher.get_error())
        if self.failed is not None:
            out[self._stop] = 1
        else:
            out[: self._known] = np.unpackbits(self._words.view(np.uint8), bitorder="little")[: self._known]
        return out

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens the grammar allows next."""
        return torch.from_numpy(self._bits().view(np.bool_))

    def __call__(self, logits: torch.Tensor, generated: Sequence[int]) -> torch.Tensor:
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"the grammar was built for a vocabulary of {self.vocab_size} tokens, the model's "
                             f"logits have {logits.shape[-1]}")
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
            # numpy, single-threaded: torch's parallel masked_fill took 30 ms a row on a loaded
            # 2-core CPU (its threads wait for cores); putmask takes ~0.1 ms for 128K tokens.
            np.putmask(logits.numpy(), self._bits() == 0, -np.inf)
            return logits
        return logits.masked_fill_(~self.allowed().to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        if self.failed is None and not self.matcher.consume_token(token):
            self._fail(self.matcher.get_error())

    @property
    def complete(self) -> bool:
        """The output so far is a whole sentence of the grammar (a stop token may end it)."""
        return self.failed is None and self.matcher.is_accepting()

    def _fail(self, error: str) -> None:
        self.failed = error or "the grammar engine refused a token"
        log.error("grammar matcher failed (%s); only stop tokens are allowed from here", self.failed)
