"""The engine with LoRA adapters: rows of one decode step on different adapters (and the base)
produce what each adapter merged into the base weights produces alone."""

import copy

import pytest
import torch

from herd.generate import GREEDY, generate
from herd.generate.adapters import load_adapters
from herd.posttrain.lora import apply_lora, lora_parameters, save_adapter
from herd.serve.engine import Engine, Request


def _adapter(model, path, targets, rank, seed):
    m = copy.deepcopy(model)
    apply_lora(m, targets, rank, 2.0 * rank)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(m):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_adapter(m, path)
    return path


@pytest.fixture
def served(model, tmp_path):
    paths = {"x": _adapter(model, tmp_path / "x", ["wq", "wv", "w2"], 4, 1),
             "y": _adapter(model, tmp_path / "y", ["wk", "wo", "w1", "w3", "output"], 2, 2)}
    m = copy.deepcopy(model)
    return m, load_adapters(m, paths)


def _merged(model, adapter):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name in adapter.weights:
            m.get_submodule(name).weight += adapter.delta(name)
    return m


def test_rows_on_different_adapters_equal_merged_models_alone(model, served):
    m, adapters = served
    engine = Engine(m, max_batch=4, adapters=adapters)
    refs = {None: model, **{a.name: _merged(model, a) for a in adapters.adapters}}
    jobs = [([1, 2, 3, 4, 5], "x"), ([9, 8, 7], None), ([1, 2, 3, 4, 5], "y"), ([40, 41], "x"), ([1, 2, 3, 4, 5], None)]
    handles = [engine.submit(Request(p, 10, GREEDY, adapter=a)) for p, a in jobs]
    engine.run_until_idle()
    outs = [h.result().choices[0].tokens for h in handles]
    for (prompt, name), got in zip(jobs, outs):
        want = generate(refs[name], [prompt], max_new_tokens=10, sampling=GREEDY)[0].tokens
        assert got == want, name
    assert len({tuple(outs[0]), tuple(outs[2]), tuple(outs[4])}) == 3  # same prompt, three different models


def test_unknown_adapters_and_compile_are_refused(model, served):
    m, adapters = served
    with pytest.raises(ValueError, match="unknown LoRA adapter 'z'; this engine has: x, y"):
        Engine(m, adapters=adapters).submit(Request([1, 2], 3, adapter="z"))
    with pytest.raises(ValueError, match="unknown LoRA adapter 'x'; this engine has: none"):
        Engine(model).submit(Request([1, 2], 3, adapter="x"))
    with pytest.raises(ValueError, match="compile=True cannot serve LoRA adapters"):
        Engine(m, adapters=adapters, compile=True)


def test_the_prefix_cache_never_serves_one_adapters_blocks_to_another(model, served):
    # Keys and values depend on the adapter: the same long prompt under the base, then x, then y
    # must each prefill whole (and give their merged model's answer); a second x request hits x's blocks.
    m, adapters = served
    engine = Engine(m, max_batch=2, block_size=4, adapters=adapters)
    refs = {None: model, **{a.name: _merged(model, a) for a in adapters.adapters}}
    prompt = list(range(3, 40))
    for name, fresh in ((None, True), ("x", True), ("y", True), ("x", False)):
        before = engine.metrics().prefill_tokens_total
        h = engine.submit(Request(prompt, 6, GREEDY, adapter=name))
        engine.run_until_idle()
        prefilled = engine.metrics().prefill_tokens_total - before
        assert (prefilled == len(prompt)) == fresh, (name, prefilled)
        want = generate(refs[name], [prompt], max_new_tokens=6, sampling=GREEDY)[0].tokens
        assert h.result(0).choices[0].tokens == want, name
