"""Grammar masks on real byte-level BPE vocabularies (Llama 3's tiktoken, SmolLM2's HF tokenizer),
checked against independent references: `jsonschema` on random walks, and an exhaustive
prefix check of every token id for a small language."""

import json
import random

import jsonschema
import numpy as np
import pytest
import torch

from herd.tokenizer import Tokenizer, llama3_tokenizer_path

pytest.importorskip("llguidance")
from herd.generate.grammar import GrammarCompiler  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": -5, "maximum": 500},
        "label": {"type": "string", "maxLength": 6},
        "ok": {"type": "boolean"},
        "kind": {"enum": ["a", "b", None]},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2}$"},
        "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
    },
    "required": ["id", "label", "ok", "kind", "code", "items"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llama3():
    return Tokenizer.from_file(llama3_tokenizer_path())


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from herd.tokenizer.resolve import load_tokenizer

    return load_tokenizer(smollm2_gguf, None, vocab_size=49152)


def _walk(processor, tok, vocab_size, rng, special, max_steps=400):
    """Sample like a random-weight model: random logits, masked, drawn at temperature 1 (Gumbel-max)."""
    out = []
    for _ in range(max_steps):
        logits = torch.from_numpy(rng.standard_normal(vocab_size, dtype=np.float32))
        masked = processor(logits, out).numpy()
        t = int(np.argmax(masked + rng.gumbel(size=vocab_size)))
        processor.accept(t)
        if t in tok.stop_tokens:
            return out
        assert t not in special, f"special token {t} allowed inside the output"
        out.append(t)
        if processor.complete:  # the grammar is done: only a stop token may follow
            allowed = processor.allowed().nonzero().view(-1).tolist()
            assert set(allowed) == set(tok.stop_tokens), allowed
    raise AssertionError(f"no end within {max_steps} tokens: {tok.decode(out)!r}")


@pytest.mark.parametrize("which", ["llama3", "smollm2"])
def test_random_walks_always_validate(which, request):
    tok = request.getfixturevalue(which)
    compiler = GrammarCompiler(tok, tok.n_words)
    grammar = compiler.json_schema(SCHEMA, strict=True)
    special = set(tok.special_tokens.values())
    rng = np.random.default_rng(0)
    texts = set()
    for _ in range(12):
        text = tok.decode(_walk(grammar.processor(), tok, tok.n_words, rng, special))
        jsonschema.validate(json.loads(text), SCHEMA)
        texts.add(text)
    assert len(texts) == 12


def test_the_mask_is_exactly_the_tokens_that_keep_a_prefix(llama3):
    """{"enum": [...]}: token t is allowed after text P iff P + t is a prefix of a member's JSON
    text, checked for every id of the 128K vocabulary at every step of a walk."""
    words = ["alpha", "alpine", "beta", "b\u00e9ta"]
    targets = [json.dumps(w, ensure_ascii=False).encode() for w in words]
    compiler = GrammarCompiler(llama3, llama3.n_words)
    processor = compiler.json_schema({"enum": words}).processor()
    table = [llama3.decode_single_token_bytes(i) for i in range(llama3.n_words)]
    special = set(llama3.special_tokens.values())
    rng = random.Random(0)
    for _ in range(3):
        processor = compiler.json_schema({"enum": words}).processor()
        done = b""
        while True:
            got = set(processor.allowed().nonzero().view(-1).tolist())
            want = {i for i, b in enumerate(table) if i not in special and b and
                    any(t.startswith(done + b) for t in targets)}
            if done in targets:
                want |= set(llama3.stop_tokens)
            assert got == want
            t = rng.choice(sorted(got))
            processor.accept(t)
            if t in llama3.stop_tokens:
                break
            done += table[t]
        assert done in targets


def test_a_padded_model_vocabulary_never_gets_the_padding(llama3):
    V = llama3.n_words + 40  # embeddings padded past the tokenizer, as some checkpoints are
    processor = GrammarCompiler(llama3, V).json_schema({"type": "integer"}).processor()
    logits = torch.zeros(V)
    logits[llama3.n_words:] = 100.0  # the model would pick a padding id
    masked = processor(logits, [])
    assert torch.isinf(masked[llama3.n_words:]).all() and not torch.isinf(masked).all()
    with pytest.raises(ValueError, match=str(V)):
        processor(torch.zeros(llama3.n_words), [])


def test_schema_errors_say_what_is_wrong(llama3):
    compiler = GrammarCompiler(llama3, llama3.n_words)
    with pytest.raises(ValueError, match="Invalid type"):
        compiler.json_schema({"type": "objet"})
    with pytest.raises(ValueError, match="uniqueItems"):
        compiler.json_schema({"type": "array", "uniqueItems": True}, strict=True)
    compiler.json_schema({"type": "array", "uniqueItems": True}, strict=False)  # best effort: ignored
    with pytest.raises(ValueError, match="must be an object"):
        compiler.json_schema([1])
    with pytest.raises(ValueError, match="stop tokens"):
        GrammarCompiler(llama3, 1000)
