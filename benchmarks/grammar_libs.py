"""xgrammar vs llguidance on this machine: the evidence behind herd's choice of grammar library.

For each vocabulary (Llama 3's 128,256-token tiktoken vocabulary; SmolLM2's 49,152-token HF
byte-level BPE from its GGUF) both libraries get the same token table, built from herd's own
tokenizer (`decode_single_token_bytes` for every id; special tokens marked special, never text).
Then, per library:

* mask time: a random walk through a JSON schema (at each step the token mask is computed, one
  allowed token is drawn uniformly at random, the matcher consumes it), the mean time of one mask
  over all steps of `--walks` walks; uniform draws are the worst case, a random model's;
* correctness: each finished walk's bytes, decoded, must parse and validate with `jsonschema`;
* coverage: which JSON-schema keywords compile (a keyword that does not compile, or is ignored,
  cannot be promised to clients).

    python benchmarks/grammar_libs.py [--walks 20]

Prints one JSON line per (library, vocabulary) and one for coverage. Needs both libraries
installed (`pip install llguidance xgrammar`; xgrammar with `--no-deps` keeps triton out).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import jsonschema
import torch

from herd.model.zoo import smollm2_path
from herd.tokenizer import Tokenizer, llama3_tokenizer_path
from herd.tokenizer.resolve import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "email", "tags", "role", "address"],
    "additionalProperties": False,
}

# One schema per keyword family; "ok" = compiles (a separate walk checks it is enforced).
COVERAGE = {
    "string minLength/maxLength": {"type": "string", "minLength": 2, "maxLength": 5},
    "string pattern": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
    "string format date-time": {"type": "string", "format": "date-time"},
    "string format email": {"type": "string", "format": "email"},
    "string format uuid": {"type": "string", "format": "uuid"},
    "integer minimum/maximum": {"type": "integer", "minimum": 3, "maximum": 70},
    "number exclusiveMinimum": {"type": "number", "exclusiveMinimum": 0},
    "integer multipleOf": {"type": "integer", "multipleOf": 5},
    "enum / const": {"anyOf": [{"enum": [1, "a", None]}, {"const": "b"}]},
    "array minItems/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "array prefixItems": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
    "array uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "anyOf": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]},
    "$ref / $defs (recursive)": {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "next": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/node"}]}},
        "required": ["v", "next"]}}, "$ref": "#/$defs/node"},
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"}},
    "patternProperties": {"type": "object", "patternProperties": {"^x": {"type": "integer"}}},
    "minProperties/maxProperties": {"type": "object", "minProperties": 1, "maxProperties": 2},
    "if/then/else": {"if": {"type": "integer"}, "then": {"minimum": 0}, "else": {"type": "string"}},
    "not": {"not": {"type": "string"}},
}


def vocabularies():
    yield "llama3-128k", Tokenizer.from_file(llama3_tokenizer_path()), 128256
    path = smollm2_path()
    yield "smollm2-49k", load_tokenizer(path, None, vocab_size=49152), 49152


class LLG:
    name = "llguidance"

    def __init__(self, tok, vocab_size: int):
        import llguidance

        self.llg = llguidance
        self.tok = build_llg_tokenizer(tok, vocab_size)
        self.vocab_size = vocab_size

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        ok, msgs = self.llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tok)
        if ok:
            raise ValueError(msgs[0])
        return grammar

    def matcher(self, grammar):
        return _LLGMatcher(self.llg.LLMatcher(self.tok, grammar), self.vocab_size)


class _LLGMatcher:
    def __init__(self, m, vocab_size):
        self.m = m
        self.mask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        self.m.unsafe_compute_mask_ptr(self.mask.data_ptr(), self.mask.numel() * 4)
        return self.mask

    def consume(self, t: int) -> bool:
        return self.m.consume_token(t)

    def done(self) -> bool:
        return self.m.is_stopped()


class XGR:
    name = "xgrammar"

    def __init__(self, tok, vocab_size: int):
        import xgrammar

        self.xgr = xgrammar
        special = set(tok.special_tokens.values())
        vocab = [b"" if i in special else tok.decode_single_token_bytes(i) for i in range(tok.n_words)]
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=vocab_size,
                                      stop_token_ids=list(tok.stop_tokens))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self.vocab_size = vocab_size

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(schema, any_whitespace=False)

    def matcher(self, grammar):
        return _XGRMatcher(self.xgr, grammar, self.vocab_size)


class _XGRMatcher:
    def __init__(self, xgr, grammar, vocab_size):
        self.m = xgr.GrammarMatcher(grammar)
        self.mask = xgr.allocate_token_bitmask(1, vocab_size)

    def allowed(self) -> torch.Tensor:
        self.m.fill_next_token_bitmask(self.mask)
        return self.mask[0]

    def consume(self, t: int) -> bool:
        return self.m.accept_token(t)

    def done(self) -> bool:
        return self.m.is_terminated()


def build_llg_tokenizer(tok, vocab_size: int):
    import llguidance

    special = set(tok.special_tokens.values())

    class Wrapped:  # llguidance.TokenizerWrapper's duck type
        eos_token_id = tok.eos_id
        bos_token_id = tok.bos_id
        tokens = [tok.decode_single_token_bytes(i) for i in range(tok.n_words)]
        special_token_ids = sorted(special)

        def __call__(self, s: bytes) -> list[int]:
            return tok.encode(s.decode("utf-8", errors="replace"), bos=False, eos=False)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()), n_vocab=vocab_size,
                                  eos_token=list(tok.stop_tokens))


def allowed_ids(mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    bits = (mask.view(-1, 1) >> torch.arange(32, dtype=torch.int32)) & 1  # (W, 32)
    return bits.view(-1)[:vocab_size].nonzero().view(-1)


def walk(lib, grammar, tok, rng: random.Random, max_steps: int = 300):
    m = lib.matcher(grammar)
    special = set(tok.special_tokens.values())
    out: list[int] = []
    mask_s = 0.0
    steps = 0
    for _ in range(max_steps):
        t0 = time.perf_counter()
        mask = m.allowed()
        mask_s += time.perf_counter() - t0
        steps += 1
        ids = allowed_ids(mask, lib.vocab_size).tolist()
        if not ids:
            return None, mask_s, steps, "empty mask"
        t = ids[rng.randrange(len(ids))]
        if not m.consume(t):
            return None, mask_s, steps, f"allowed token {t} refused"
        if t in tok.stop_tokens:
            break
        if t in special:
            return None, mask_s, steps, f"special token {t} allowed inside the JSON"
        out.append(t)
        if m.done():
            break
    else:
        return None, mask_s, steps, "no end within max_steps"
    return tok.decode(out), mask_s, steps, None


def enforced(lib, grammar, tok, schema: dict, walks: int = 10) -> str:
    """Whether a schema that compiled is also enforced: `walks` random walks, each output validated."""
    rng = random.Random(1)
    bad = unfinished = 0
    for _ in range(walks):
        text, _, _, err = walk(lib, grammar, tok, rng, max_steps=60)
        if err is not None:
            unfinished += 1
            continue
        try:
            jsonschema.validate(json.loads(text), schema)
        except (json.JSONDecodeError, jsonschema.ValidationError):
            bad += 1
    if bad:
        return f"compiles, NOT enforced: {bad}/{walks - unfinished} finished walks invalid"
    return f"ok ({walks - unfinished}/{walks} walks finished, all valid)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--walks", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    coverage: dict[str, dict[str, str]] = {}
    for vname, tok, vocab_size in vocabularies():
        for cls in (LLG, XGR):
            t0 = time.perf_counter()
            lib = cls(tok, vocab_size)
            init_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            grammar = lib.compile(SCHEMA)
            compile_s = time.perf_counter() - t0
            rng = random.Random(0)
            valid = failures = 0
            mask_s = steps = 0
            errors: list[str] = []
            for _ in range(args.walks):
                text, s, n, err = walk(lib, grammar, tok, rng)
                mask_s, steps = mask_s + s, steps + n
                if err is None:
                    try:
                        jsonschema.validate(json.loads(text), SCHEMA)
                        valid += 1
                        continue
                    except (json.JSONDecodeError, jsonschema.ValidationError) as e:
                        err = f"invalid output {text!r}: {e}"[:200]
                failures += 1
                errors.append(err)
            print(json.dumps({"library": lib.name, "vocab": vname, "vocab_size": vocab_size,
                              "tokenizer_init_s": round(init_s, 3), "schema_compile_s": round(compile_s, 4),
                              "mask_us_per_token": round(1e6 * mask_s / steps, 1), "steps": steps,
                              "walks": args.walks, "valid": valid, "failures": failures, "errors": errors[:3]}),
                  flush=True)
            if vname == "llama3-128k":
                for key, schema in COVERAGE.items():
                    try:
                        g = lib.compile(schema)
                    except Exception as e:  # noqa: BLE001 - recording what each library refuses
                        coverage.setdefault(key, {})[lib.name] = f"refused: {str(e).splitlines()[0][:100]}"
                        continue
                    coverage.setdefault(key, {})[lib.name] = enforced(lib, g, tok, schema)
    print(json.dumps({"coverage": coverage}))


if __name__ == "__main__":
    main()
