"""The int4 decode twin of a Q4_0 GGUF file (Q4_1 maps the same way; herd writes Q4_0) and the per-batch-size choice between it and fp32:
the twin computes what the dequantized model computes (checked against the fp32 model's own
decode and `generate`), and the engine's tokens do not depend on which one decodes a step."""

import pytest
import torch

from herd.generate import GREEDY, KVCache, decode_step, generate
from herd.generate.fast_decode import apply_fast_decode
from herd.model import ModelArgs, build_model, load_model
from herd.quant import apply_cpu_kernels
from herd.quant.linear import Int4Linear
from herd.serve import Engine, Request
from herd.serve.decode_choice import DecodeChoice, batch_sizes, choose_decode

gguf = pytest.importorskip("gguf")

from herd.generate.loading import q4_decode_twin  # noqa: E402
from herd.model.gguf import write_gguf  # noqa: E402


def _vocab() -> dict:
    """258 byte-level tokens in GGUF metadata (as tests/unit/model/test_gguf.py writes them)."""
    from tests.unit.model.test_gguf import byte_vocab

    return byte_vocab()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    m = build_model(ModelArgs.from_name("debug", vocab_size=258, tie_embeddings=True), seed=0)
    with torch.no_grad():  # sharp distributions, so greedy tokens are stable under fp32 rounding
        for layer in m.layers.values():
            for w in (layer.attention.wq, layer.attention.wk, layer.attention.wo, layer.feed_forward.w2):
                w.weight.mul_(4.0)
    root = tmp_path_factory.mktemp("q4")
    return {q: write_gguf(m, root / f"m-{q}.gguf", qtype=q, tokenizer_metadata=_vocab(), name="m")
            for q in ("Q4_0", "Q8_0")}


@pytest.fixture(scope="module")
def pair(files):
    fp32 = load_model(files["Q4_0"], dtype=torch.float32).eval()  # the file dequantized, as herd serve holds it
    apply_cpu_kernels(fp32)
    apply_fast_decode(fp32)
    twin, why = q4_decode_twin(fp32, files["Q4_0"])
    assert twin is not None, why
    return fp32, twin


def test_the_twin_keeps_the_blocks_and_shares_everything_else(pair):
    fp32, twin = pair
    linears = [m for n, m in twin.named_modules() if n.startswith("layers.") and n.count(".") == 3]
    assert linears and all(isinstance(m, Int4Linear) for m in linears)
    assert twin.tok_embeddings is fp32.tok_embeddings and twin.output is fp32.output and twin.norm is fp32.norm
    for i, lin in enumerate(linears[:3]):  # the int4 codes dequantize to the fp32 model's weights
        name = [n for n, m in twin.named_modules() if m is lin][0]
        torch.testing.assert_close(lin.dequantize(), fp32.get_submodule(name).weight, rtol=0, atol=1e-6)


def test_the_twin_decodes_what_the_fp32_model_decodes(pair):
    fp32, twin = pair
    caches = [KVCache(fp32.args, batch_size=3, max_seq_len=32) for _ in range(2)]
    tokens = torch.tensor([[5, 9, 200, 17], [3, 3, 3, 3], [250, 1, 99, 42]])
    with torch.inference_mode():
        for t in range(tokens.shape[1]):
            pos = torch.full((3,), t)
            a = decode_step(fp32, tokens[:, t], pos, caches[0])
            b = decode_step(twin, tokens[:, t], pos, caches[1])
            torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


def test_no_twin_for_other_quantizations_or_files(files, pair, tmp_path):
    fp32 = load_model(files["Q8_0"], dtype=torch.float32).eval()
    twin, why = q4_decode_twin(fp32, files["Q8_0"])
    assert twin is None and "not Q4_0/Q4_1" in why
    twin, why = q4_decode_twin(pair[0], tmp_path / "model.safetensors")
    assert twin is None and "not a GGUF file" in why


def test_auto_picks_the_faster_model_per_batch_size(pair):
    fp32, twin = pair
    cache = KVCache(fp32.args, batch_size=8, max_seq_len=16)
    # A fake clock: each timed step of "int4" takes 1 s at 1-2 rows and 3 s above; "fp32" takes 2 s.
    cost = {1: (2.0, 1.0), 2: (2.0, 1.0), 4: (2.0, 3.0), 8: (2.0, 3.0)}
    seq = []
    for b in batch_sizes(8):
        for c in cost[b]:
            seq += [0.0, c]
    clock = iter(seq)
    choice = choose_decode({"fp32": fp32, "int4": twin}, cache, repeats=1, timer=lambda: next(clock))
    assert choice.by_rows == {1: "int4", 2: "int4", 4: "fp32", 8: "fp32"}
    assert choice.pick(1) is twin and choice.pick(3) is fp32 and choice.pick(8) is fp32
    assert "4 rows: fp32 (fp32 2000 ms / int4 3000 ms)" in choice.describe()
    assert choose_decode({"fp32": fp32, "int4": twin}, cache, mode="always").pick(5) is twin
    assert choose_decode({"fp32": fp32}, cache, mode="never").pick(5) is fp32
    with pytest.raises(ValueError, match="unknown decode choice 'fast'"):
        choose_decode({"fp32": fp32, "int4": twin}, cache, mode="fast")
    with pytest.raises(ValueError, match="needs a main model and its twin"):
        choose_decode({"fp32": fp32}, cache, mode="auto")


def test_the_engine_gives_the_same_tokens_whichever_decodes(pair):
    fp32, twin = pair
    prompts = [[5, 9, 200, 17, 3], [250, 1, 99], [7] * 9, [60, 61, 62, 63]]
    # int4 for steps of 1-2 rows, fp32 for more: as requests finish, sequences cross between them.
    choice = DecodeChoice({"fp32": fp32, "int4": twin}, {1: "int4", 2: "int4", 4: "fp32"}, {})
    engine = Engine(fp32, max_batch=4, max_seq_len=64, block_size=4, decode_choice=choice)
    handles = [engine.submit(Request(p, n)) for p, n in zip(prompts, (12, 4, 8, 16))]
    engine.run_until_idle()
    for p, n, h in zip(prompts, (12, 4, 8, 16), handles):
        assert h.result(0).choices[0].tokens == generate(fp32, [p], max_new_tokens=n, sampling=GREEDY)[0].tokens
    with pytest.raises(ValueError, match="cannot be combined with compile"):
        Engine(fp32, max_batch=4, compile=True, decode_choice=choice)
    with pytest.raises(ValueError, match="main model is not the engine's model"):
        Engine(twin, max_batch=4, decode_choice=choice)


def test_serve_refuses_q4_decode_always_where_it_cannot_apply(files, capsys, tmp_path):
    from herd.cli import main

    assert main(["serve", str(tmp_path / "model-dir"), "--q4-decode", "always"]) == 2  # before any loading
    assert "is not a .gguf file" in capsys.readouterr().err
    assert main(["serve", str(files["Q4_0"]), "--q4-decode", "always", "--compile"]) == 2
    assert "it needs CPU, fp32 and no --compile" in capsys.readouterr().err
    assert main(["serve", str(files["Q8_0"]), "--q4-decode", "always", "--port", "1"]) == 2  # after loading
    assert "not Q4_0/Q4_1" in capsys.readouterr().err
