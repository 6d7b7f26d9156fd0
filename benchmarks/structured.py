"""The throughput cost of structured output in the serving engine: tokens/s with and without a JSON schema.

Same model, same prompts, greedy decoding, in one run. The schema (an array of at least 1,000
objects with strings, integers and enums) cannot be complete within `--max-tokens`, so every
constrained choice runs to its length limit exactly as the unconstrained ones do (they ignore
stop tokens): both phases generate the same number of tokens with the same batch occupancy, and
the difference is the grammar's cost alone (mask computation, masking, matcher updates, all on
the engine thread). The phases alternate for `--rounds` rounds; the medians are compared. The
target (issue 15) is at most 10% fewer tokens/s with the schema. On a shared, loaded machine the
tokens/s of two phases differ by more than the grammar costs, so the grammar's own time is also
measured directly (each processor call and update timed): its share of the schema phase's wall
time is the slowdown it causes, whatever the noise.

    python benchmarks/structured.py                      # SmolLM2-135M-Instruct (49K vocabulary)
    python benchmarks/structured.py --random-llama3      # random 78M model, Llama 3's 128K vocabulary

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jsonschema  # noqa: F401 - the test extra; imported to fail early if the environment is incomplete
import torch

from herd.generate import SamplingParams
from herd.generate.grammar import GrammarCompiler
from herd.serve import Engine, Request

SCHEMA = {
    "type": "array",
    "minItems": 1000,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        },
        "required": ["name", "age", "role", "tags"],
        "additionalProperties": False,
    },
}
TOPICS = ["a library", "a football team", "a small company", "a school class", "a hospital ward", "a band",
          "a chess club", "a research lab", "a film crew", "a kitchen brigade", "a ship's crew", "a choir",
          "a hiking group", "a startup", "a newsroom", "a city council"]


def load(opts):
    if opts.random_llama3:
        from herd.model import ModelArgs, build_model
        from herd.tokenizer import ChatFormat, Tokenizer, llama3_tokenizer_path

        tok = Tokenizer.from_file(llama3_tokenizer_path())
        args = ModelArgs(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=128256, multiple_of=64,
                         max_seq_len=1024)
        model = build_model(args, seed=0).eval()
        chat = ChatFormat(tok, version="3.1")
        return "random-llama3-dim512x4", model, tok, chat
    from herd.generate.loading import load_for_inference
    from herd.model.zoo import smollm2_path

    lm = load_for_inference(opts.model or smollm2_path())
    return lm.path.name, lm.model, lm.tokenizer, lm.chat


class Timed:
    """Wraps a grammar processor and adds the seconds its mask and its update take to `spent`."""

    spent = 0.0
    calls = 0

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, logits, generated):
        t0 = time.perf_counter()
        out = self.inner(logits, generated)
        Timed.spent += time.perf_counter() - t0
        Timed.calls += 1
        return out

    def accept(self, token):
        t0 = time.perf_counter()
        self.inner.accept(token)
        Timed.spent += time.perf_counter() - t0


def run_phase(engine: Engine, prompts: list[list[int]], opts, processors) -> tuple[float, int]:
    """(wall seconds, generated tokens) of all prompts submitted at once and run to the end."""
    # Greedy: its cost does not depend on the mask. (`sample` sorts the whole row; a masked row,
    # mostly -inf, sorts much faster, which made sampled schema phases *faster* than plain ones.)
    sampling = SamplingParams(temperature=0)
    before = engine.metrics().generation_tokens_total
    t0 = time.perf_counter()
    handles = [engine.submit(Request(p, opts.max_tokens, sampling, stop_tokens=(), logits_processors=processors))
               for p in prompts]
    engine.run_until_idle()
    wall = time.perf_counter() - t0
    for h in handles:
        assert all(c.finish_reason == "length" for c in h.result(0).choices)
    return wall, engine.metrics().generation_tokens_total - before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint (default: SmolLM2-135M-Instruct from herd's model zoo)")
    p.add_argument("--random-llama3", action="store_true", help="a random 78M model with Llama 3's vocabulary")
    p.add_argument("--requests", type=int, default=8, help="prompts, all running together (one batch)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    opts = p.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    name, model, tok, chat = load(opts)
    from herd.tokenizer import Message

    prompts = [chat.encode_dialog_prompt([Message("user", f"List the members of {TOPICS[i % len(TOPICS)]} as JSON.")])
               .tokens for i in range(opts.requests)]
    engine = Engine(model, max_batch=opts.requests, max_seq_len=max(map(len, prompts)) + opts.max_tokens + 1,
                    token_bytes=tok.decode_single_token_bytes)
    t0 = time.perf_counter()
    grammar = GrammarCompiler(tok, model.args.vocab_size).json_schema(SCHEMA)
    setup = time.perf_counter() - t0
    run_phase(engine, prompts[:2], opts, ())  # warm-up: first-call costs out of the timings
    run_phase(engine, prompts[:2], opts, (grammar.processor,))
    timed = (lambda: Timed(grammar.processor()),)
    rates: dict[str, list[float]] = {"plain": [], "schema": []}
    grammar_share: list[float] = []
    for r in range(opts.rounds):
        order = ["plain", "schema"] if r % 2 == 0 else ["schema", "plain"]
        for phase in order:
            Timed.spent = Timed.calls = 0
            wall, tokens = run_phase(engine, prompts, opts, timed if phase == "schema" else ())
            rates[phase].append(tokens / wall)
            if phase == "schema":
                grammar_share.append(Timed.spent / wall)
                mask_ms = 1e3 * Timed.spent / Timed.calls
            print(f"round {r} {phase:>6}: {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f} tokens/s", flush=True)
    plain, schema = statistics.median(rates["plain"]), statistics.median(rates["schema"])
    print(json.dumps({"benchmark": "structured_output_throughput", "model": name, "vocab_size": model.args.vocab_size,
                      "requests": opts.requests, "max_tokens": opts.max_tokens, "rounds": opts.rounds,
                      "torch_threads": torch.get_num_threads(), "grammar_setup_s": round(setup, 3),
                      "plain_tokens_per_s": round(plain, 2), "schema_tokens_per_s": round(schema, 2),
                      "slowdown_pct": round(100 * (1 - schema / plain), 2),
                      "grammar_share_of_schema_wall_pct": round(100 * statistics.median(grammar_share), 2),
                      "grammar_ms_per_token": round(mask_ms, 3),
                      "plain_all": [round(x, 2) for x in rates["plain"]],
                      "schema_all": [round(x, 2) for x in rates["schema"]]}))


if __name__ == "__main__":
    main()
