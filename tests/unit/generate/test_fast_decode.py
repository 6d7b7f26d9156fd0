"""The fused decode block against the eager block, HF transformers, and its fallbacks.

Equality is to fp32 reassociation: the fused op sums in vector lanes where ATen sums otherwise,
so logits differ by ~1e-6 relative, far inside the tolerances here, while a wrong position, a
missing RoPE, an off-by-one key or a swapped weight moves them by whole units (the debug model of
conftest.py is tuned so the context matters).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

import herd.kernels
from herd.generate import GREEDY, KVCache, decode_step, generate, pad_prompts, prefill
from herd.generate.compiled import CompiledDecoder
from herd.generate.fast_decode import (
    FusedDecodeBlock,
    apply_fast_decode,
    remove_fast_decode,
)
from herd.kernels import cpu_kernels, unavailable_reason
from herd.model import load_model
from herd.model.llama import TransformerBlock
from herd.quant import QuantConfig, apply_cpu_kernels, quantize
from herd.serve import Engine, Request

RAGGED = [[5, 17, 3, 99, 42], [7, 1, 250, 33, 8, 19, 64, 2, 11], [200, 9]]


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if cpu_kernels() is None:
        if os.environ.get("HERD_CPU_KERNELS") == "0":
            pytest.skip("HERD_CPU_KERNELS=0: kernels disabled on purpose")
        pytest.fail(f"herd's CPU kernels did not build: {unavailable_reason()}")


def _variant(model, name: str):
    m = copy.deepcopy(model)
    if name == "fp32_mkl":
        pass  # plain nn.Linear: eager uses MKL, the fused op the f32 kernel
    elif name == "fp32":
        apply_cpu_kernels(m)
    elif name.startswith("int8"):
        quantize(m, QuantConfig("int8", activations="int8" if name.endswith("a8") else "float"))
    else:
        quantize(m, QuantConfig("int4", group_size=32, activations="int8" if name.endswith("a8") else "float"))
        if name.startswith("int4_tiles"):
            apply_cpu_kernels(m)  # repacks the int4 weights into the decode kernels' tiles
    return m


def _decode_logits(model, prompts, fed_steps: list[list[int]], *, cache_rows: int | None = None) -> torch.Tensor:
    """Prefill the ragged prompts, then feed the given tokens step by step: (steps, B, V) logits."""
    B = len(prompts)
    cache = KVCache(model.args, batch_size=cache_rows or B, max_seq_len=48)
    tokens, lengths = pad_prompts(prompts, device="cpu")
    prefill(model, tokens, cache)
    out = []
    for j, fed in enumerate(fed_steps):
        out.append(decode_step(model, torch.tensor(fed), lengths + j, cache))
    return torch.stack(out)


FED = [[3, 4, 5], [250, 1, 77], [9, 9, 9], [100, 20, 30], [0, 255, 128]]


@pytest.mark.parametrize("name", ["fp32_mkl", "fp32", "int8", "int4", "int4_tiles"])
@pytest.mark.parametrize("prompts", [RAGGED[1:2], RAGGED], ids=["batch1", "ragged3"])
def test_fused_decode_equals_eager(model, name, prompts):
    m = _variant(model, name)
    fed = [f[: len(prompts)] for f in FED]
    want = _decode_logits(m, prompts, fed)
    assert apply_fast_decode(m) == m.args.n_layers
    assert all(type(b) is FusedDecodeBlock for b in m.layers.values())
    got = _decode_logits(m, prompts, fed, cache_rows=4)  # a cache with a spare row, as the engine has
    assert (want[0].std() > 1.0).all(), "the logits must vary enough for the comparison to mean something"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["fp32", "int4", "int4_tiles"])
def test_fused_decode_batch_16_ragged(model, name):
    # The kernels' row limit: 16 rows per GEMV, positions 1..31 apart, rows of one step at
    # different positions (some past others' prompt ends).
    g = torch.Generator().manual_seed(16)
    prompts = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in torch.randint(1, 32, (16,), generator=g)]
    fed = [torch.randint(0, 256, (16,), generator=g).tolist() for _ in range(3)]
    m = _variant(model, name)
    want = _decode_logits(m, prompts, fed)
    apply_fast_decode(m)
    torch.testing.assert_close(_decode_logits(m, prompts, fed), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("scheme", ["int8", "int4", "int4_tiles"])
def test_fused_int8_activations_keep_the_a8_error(model, scheme):
    # With int8 activations a rounding boundary can fall on either side of a 1-ulp difference in
    # the normed input, so fused and eager differ by the activation rounding itself: both must be
    # as close to the exact decode as the a8 error allows, and far closer to each other than to a
    # wrong answer.
    exact, a8 = _variant(model, scheme), _variant(model, scheme + "_a8")
    want = _decode_logits(exact, RAGGED, FED)
    eager = _decode_logits(a8, RAGGED, FED)
    apply_fast_decode(a8)
    got = _decode_logits(a8, RAGGED, FED)
    eager_err = (eager - want).abs().max()
    assert 0 < eager_err < 0.1
    assert (got - want).abs().max() < 3 * eager_err
    assert (got - eager).abs().max() < 3 * eager_err


@pytest.mark.parametrize("isa", [0, 1], ids=["avx2", "avx512"])
def test_fused_decode_reads_int4_tiles_and_follows_new_weights(model, isa):
    ops = cpu_kernels()
    before = ops.set_max_isa(isa)
    try:
        if ops.tiles_isa() != isa:
            pytest.skip("this CPU (or HERD_CPU_ISA) leaves the AVX-512 tile kernels out")
        rows = _variant(model, "int4")
        want = _decode_logits(rows, RAGGED, FED)
        m = _variant(model, "int4_tiles")
        apply_fast_decode(m)
        torch.testing.assert_close(_decode_logits(m, RAGGED, FED), want, rtol=1e-5, atol=2e-5)
        assert all(b._operands().kind == herd.kernels.KIND_INT4_TILES for b in m.layers.values())
        # New weights written in place (load_state_dict copies into the row-layout buffers): the
        # fused blocks must not keep decoding with tiles of the old ones.
        other = copy.deepcopy(model)
        with torch.no_grad():
            for block in other.layers.values():
                block.feed_forward.w2.weight.mul_(-1.5)
        other = _variant(other, "int4")
        want = _decode_logits(other, RAGGED, FED)
        m.load_state_dict(other.state_dict())
        for block in m.layers.values():  # before any eager call (a prompt) could rebuild them
            op = block._operands()
            att, ffn = block.attention, block.feed_forward
            for tiles, lin in zip(op.tensors, (att.wq, att.wk, att.wv, att.wo, ffn.w1, ffn.w2, ffn.w3), strict=True):
                assert torch.equal(tiles, ops.repack_int4(lin.weight, lin.scales, lin.mins, op.group_size))
        torch.testing.assert_close(_decode_logits(m, RAGGED, FED), want, rtol=1e-5, atol=2e-5)
    finally:
        ops.set_max_isa(before)


def test_fused_decode_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, tie_word_embeddings=False,
        initializer_range=0.1,  # larger than HF's 0.02 so attention and the MLP matter, not just the embedding
        attn_implementation="eager", dtype=torch.float32,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    apply_cpu_kernels(ours)
    apply_fast_decode(ours)
    seq = [1, 45, 99, 7, 200, 13, 62, 3, 18, 128, 4, 77, 250, 9]
    S = 5  # prefill 5 tokens, then the rest one decode step at a time through the fused blocks
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0]  # (T, V)
    got = _decode_logits(ours, [seq[:S]], [[t] for t in seq[S:]])[:, 0]  # (T - S, V)
    assert ref.std() > 0.5
    torch.testing.assert_close(got, ref[S:], rtol=1e-4, atol=1e-4)


def test_other_calls_take_the_eager_block(model):
    # Prefill (S > 1), decode with autograd on, and a cache that is not a herd KVCache never reach
    # the op: their results are bit-identical to the plain model's.
    plain, fused = copy.deepcopy(model), copy.deepcopy(model)
    apply_fast_decode(fused)
    tokens = torch.tensor([RAGGED[1]])
    with torch.no_grad():
        a = plain.hidden(tokens, pos=0, cache=KVCache(model.args, batch_size=1, max_seq_len=16))
        b = fused.hidden(tokens, pos=0, cache=KVCache(model.args, batch_size=1, max_seq_len=16))
    assert torch.equal(a, b)
    step = torch.tensor([[3]])
    with torch.enable_grad():
        caches = [KVCache(model.args, batch_size=1, max_seq_len=16) for _ in range(2)]
        a = plain.hidden(step, pos=torch.tensor([[0]]), cache=caches[0])
        b = fused.hidden(step, pos=torch.tensor([[0]]), cache=caches[1])
    assert torch.equal(a, b) and b.requires_grad


def test_swap_keeps_parameters_and_state_dict(model):
    m = copy.deepcopy(model)
    before = m.state_dict()
    apply_fast_decode(m, huge_pages=False)
    after = m.state_dict()
    assert list(after) == list(before)
    assert all(after[k].data_ptr() == before[k].data_ptr() for k in before), "nothing is copied"
    values = {k: v.clone() for k, v in after.items()}
    assert apply_fast_decode(m) == 0, "already fused blocks are left alone"
    assert all(torch.equal(m.state_dict()[k], values[k]) for k in values), "huge pages move, never change, weights"
    assert remove_fast_decode(m) == m.args.n_layers
    assert all(type(b) is TransformerBlock for b in m.layers.values())
    assert list(m.state_dict()) == list(before)


def test_generate_batch_and_compiled_step_agree(model):
    m = _variant(model, "int8")
    want = generate(m, RAGGED, max_new_tokens=10, sampling=GREEDY)
    apply_fast_decode(m)
    got = generate(m, RAGGED, max_new_tokens=10, sampling=GREEDY)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    # torch.compile traces the fused op through its fake kernel (aot_eager: no code generation).
    cache, ref_cache = (KVCache(m.args, batch_size=2, max_seq_len=32) for _ in range(2))
    tokens, lengths = pad_prompts(RAGGED[:2], device="cpu")
    with torch.inference_mode():
        prefill(m, tokens, cache)
        prefill(m, tokens, ref_cache)
        step = CompiledDecoder(m, cache, backend="aot_eager")
        got_logits = step(torch.tensor([3, 4]), lengths)
        want_logits = decode_step(m, torch.tensor([3, 4]), lengths, ref_cache)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=2e-5)


def test_serving_engine_uses_the_fused_blocks(model, monkeypatch):
    m = _variant(model, "fp32")
    apply_fast_decode(m)
    calls = []
    real = herd.kernels.cpu_kernels().decode_block
    monkeypatch.setattr(herd.kernels.cpu_kernels(), "decode_block", lambda *a: calls.append(a[0].shape) or real(*a))
    engine = Engine(m, max_batch=3, max_queue=8, max_seq_len=64)
    handles = [engine.submit(Request(p, 8)) for p in RAGGED]
    engine.run_until_idle()
    for p, h in zip(RAGGED, handles):
        assert h.result(0).choices[0].tokens == generate(model, [p], max_new_tokens=8, sampling=GREEDY)[0].tokens
    assert calls and all(shape[1] == 1 for shape in calls)


def test_without_kernels_nothing_is_swapped_and_fused_blocks_fall_back(model, monkeypatch):
    fused = copy.deepcopy(model)
    apply_fast_decode(fused)
    want = generate(model, RAGGED, max_new_tokens=6, sampling=GREEDY)
    monkeypatch.setenv("HERD_CPU_KERNELS", "0")
    monkeypatch.setattr(herd.kernels, "_state", {})  # forget the loaded ops; restored after the test
    assert cpu_kernels() is None and "HERD_CPU_KERNELS=0" in unavailable_reason()
    plain = copy.deepcopy(model)
    assert apply_fast_decode(plain) == 0
    assert all(type(b) is TransformerBlock for b in plain.layers.values())
    assert [r.tokens for r in generate(fused, RAGGED, max_new_tokens=6, sampling=GREEDY)] == [r.tokens for r in want]


def test_huge_pages_keep_values_ties_and_saving(model, tmp_path):
    from safetensors.torch import load_file, save_file

    from herd.kernels.hugepages import huge_pages_available, move_to_huge_pages

    if not huge_pages_available():
        pytest.skip("no transparent huge pages here")
    m = copy.deepcopy(model)
    m.output.weight = m.tok_embeddings.weight  # a tied pair must stay one tensor
    before = {k: v.clone() for k, v in m.state_dict().items()}
    tokens = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        want = m(tokens)
    untouched = m.layers["0"].attention_norm.weight.data_ptr()  # 256 bytes: below min_bytes
    moved = move_to_huge_pages(m, min_bytes=1024)
    tied = m.tok_embeddings.weight.numel() * 4
    big = sum(v.numel() * v.element_size() for v in before.values() if v.numel() * v.element_size() >= 1024)
    assert big - tied <= moved < big - tied + 64 * len(before)  # each tensor once, cache-line aligned
    assert m.layers["0"].attention_norm.weight.data_ptr() == untouched
    assert m.output.weight is m.tok_embeddings.weight
    sd = m.state_dict()
    assert all(torch.equal(sd[k], before[k]) for k in before)
    # The arena is one mapping marked for huge pages ("hg" in its smaps flags).
    addr = m.layers["0"].feed_forward.w1.weight.data_ptr()
    smaps = Path("/proc/self/smaps").read_text().split("\n")
    for i, line in enumerate(smaps):
        lo, _, hi = line.partition(" ")[0].partition("-")
        if hi and all(c in "0123456789abcdef" for c in lo + hi) and int(lo, 16) <= addr < int(hi, 16):
            flags = next(s for s in smaps[i + 1 :] if s.startswith("VmFlags"))
            assert " hg" in flags
            break
    else:
        pytest.fail("the weight's mapping is not in /proc/self/smaps")
    # Each tensor has its own storage: safetensors saves them (it refuses shared storage).
    untied = {k: v for k, v in sd.items() if k != "output.weight"}
    save_file(untied, tmp_path / "m.safetensors")
    loaded = load_file(tmp_path / "m.safetensors")
    assert all(torch.equal(loaded[k], before[k]) for k in untied)
    with torch.inference_mode():
        assert torch.equal(m(tokens), want)

