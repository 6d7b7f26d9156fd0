"""Multi-LoRA: PEFT adapters read onto a herd model, each row of a batch on its own adapter.

References: the base model with one adapter merged into its weights (W + scale * B @ A) run
alone, and HF PEFT's own forward on the HF export of the same base.
"""

import contextlib
import copy
import importlib.util
import json

import pytest
import torch
from torch import nn

from herd.generate import KVCache, decode_step
from herd.generate.adapters import MultiLoRALinear, attach_adapters, load_adapters, read_adapter
from herd.model import save_model
from herd.model.llama import TransformerBlock
from herd.posttrain.lora import apply_lora, lora_parameters, save_adapter


def write_adapter(model, path, targets, rank, alpha, seed):
    """A random non-zero adapter saved by herd's own PEFT writer."""
    m = copy.deepcopy(model)
    apply_lora(m, targets, rank, alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(m):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_adapter(m, path)
    return path


def merged(model, adapter):
    """The reference: a copy of the base with the adapter folded into its weights."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name in adapter.weights:
            m.get_submodule(name).weight += adapter.delta(name)
    return m


@pytest.fixture
def two_adapters(model, tmp_path):
    x = write_adapter(model, tmp_path / "x", ["wq", "wk", "wv", "wo"], 4, 8.0, seed=1)
    y = write_adapter(model, tmp_path / "y", ["wq", "w1", "w2", "w3", "output"], 8, 4.0, seed=2)
    return {"x": x, "y": y}


def test_mixed_batch_rows_equal_merged_models_alone(model, two_adapters):
    served = copy.deepcopy(model)
    adapters = load_adapters(served, two_adapters)
    refs = {None: model, **{a.name: merged(model, a) for a in adapters.adapters}}
    prompts = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(0))
    choice = ["y", None, "x", "y"]
    with torch.inference_mode():
        adapters.select(choice)
        got = served(prompts)  # (4, 9, V): the prefill of a mixed batch
        for i, name in enumerate(choice):
            want = refs[name](prompts[i : i + 1])
            torch.testing.assert_close(got[i : i + 1], want, rtol=1e-4, atol=1e-4)
            assert name is None or (want - model(prompts[i : i + 1])).abs().max() > 0.1  # the adapter matters
        adapters.select_all("x")
        torch.testing.assert_close(served(prompts), refs["x"](prompts), rtol=1e-4, atol=1e-4)
        adapters.clear()
        torch.testing.assert_close(served(prompts), model(prompts), rtol=0, atol=0)


def test_mixed_decode_greedy_tokens_equal_merged_models(model, two_adapters):
    """Prefill each row under its adapter, then decode all rows together, against each reference alone."""
    served = copy.deepcopy(model)
    adapters = load_adapters(served, two_adapters)
    choice = ["x", None, "y"]
    prompt = [5, 17, 99, 3]
    want = {}
    for name in set(choice):
        ref = model if name is None else merged(model, next(a for a in adapters.adapters if a.name == name))
        want[name] = _greedy_alone(ref, prompt, 8)
    cache = KVCache(served.args, batch_size=3, max_seq_len=32, dtype=torch.float32)
    with torch.inference_mode():
        adapters.select(choice)
        logits = served(torch.tensor([prompt] * 3), pos=0, cache=cache)[:, -1]
        out = [[t] for t in logits.argmax(-1).tolist()]
        for step in range(7):
            tokens = torch.tensor([o[-1] for o in out])
            logits = decode_step(served, tokens, torch.full((3,), len(prompt) + step), cache)
            for o, t in zip(out, logits.argmax(-1).tolist()):
                o.append(t)
    for name, o in zip(choice, out):
        assert o == want[name], name
    assert len({tuple(v) for v in want.values()}) == 3  # the three rows really differ


def _greedy_alone(model, prompt, n):
    cache = KVCache(model.args, batch_size=1, max_seq_len=32, dtype=torch.float32)
    with torch.inference_mode():
        t = int(model(torch.tensor([prompt]), pos=0, cache=cache)[0, -1].argmax())
        out = [t]
        for step in range(n - 1):
            t = int(decode_step(model, torch.tensor([t]), torch.tensor([len(prompt) + step]), cache).argmax())
            out.append(t)
    return out


def test_fused_cpu_decode_and_quantized_bases(model, two_adapters):
    """The CPU kernels' linears, the fused decode blocks and an int8 base: the base path stays the base,
    and an adapter row adds exactly its delta to whatever the base computes."""
    from herd.generate import apply_fast_decode
    from herd.quant import QuantConfig, apply_cpu_kernels, quantize

    for variant in ("kernels", "int8"):
        base = copy.deepcopy(model)
        if variant == "int8":
            quantize(base, QuantConfig(scheme="int8"))
        apply_cpu_kernels(base)
        fused = apply_fast_decode(base, huge_pages=False)  # 0 where the kernels cannot be built
        served = copy.deepcopy(base)
        adapters = load_adapters(served, two_adapters)
        # Reference: plain nn.Linear layers holding the base's effective weight + the adapter's delta.
        ref = copy.deepcopy(model)
        y = next(a for a in adapters.adapters if a.name == "y")
        with torch.no_grad():
            for name, module in base.named_modules():
                if hasattr(module, "dequantize"):
                    ref.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
            ref_y = merged(ref, y)
        cache = KVCache(served.args, batch_size=2, max_seq_len=32, dtype=torch.float32)
        cache_ref = {n: KVCache(served.args, batch_size=1, max_seq_len=32, dtype=torch.float32) for n in ("b", "y")}
        prompt = torch.tensor([[7, 8, 9]])
        with torch.inference_mode():
            for row, name in enumerate((None, "y")):
                adapters.select([name])
                served.hidden(prompt, pos=0, cache=_Row(cache, row))
                (ref if name is None else ref_y).hidden(prompt, pos=0, cache=cache_ref["b" if name is None else "y"])
            tokens, pos = torch.tensor([1, 2]), torch.tensor([3, 3])
            for names, eager_blocks in (([None, None], 0 if fused else 2), ([None, "y"], 2)):
                adapters.select(names)
                with _count_eager_blocks() as calls:
                    got = decode_step(served, tokens, pos, cache)
                assert calls[0] == eager_blocks  # the fused op runs until a row needs an adapter
                want0 = decode_step(ref, tokens[:1], pos[:1], copy.deepcopy(cache_ref["b"]))
                torch.testing.assert_close(got[0], want0[0], rtol=1e-4, atol=1e-4)
            want1 = decode_step(ref_y, tokens[1:], pos[1:], cache_ref["y"])
            torch.testing.assert_close(got[1], want1[0], rtol=1e-4, atol=1e-4)


@contextlib.contextmanager
def _count_eager_blocks():
    calls = [0]
    plain = TransformerBlock.forward

    def counted(self, *args):
        calls[0] += 1
        return plain(self, *args)

    TransformerBlock.forward = counted
    try:
        yield calls
    finally:
        TransformerBlock.forward = plain


class _Row:
    """One row of a KVCache as a cache (as the serving engine prefills a newcomer)."""

    def __init__(self, cache, row):
        self.cache, self.row = cache, row

    def update(self, layer_id, k, v, pos):
        kc, vc = self.cache.k[layer_id][self.row : self.row + 1], self.cache.v[layer_id][self.row : self.row + 1]
        kc.index_copy_(2, pos[0], k)
        vc.index_copy_(2, pos[0], v)
        return kc, vc


@pytest.mark.skipif(importlib.util.find_spec("peft") is None or importlib.util.find_spec("transformers") is None,
                    reason="peft and transformers are optional")
def test_hf_peft_written_adapters_match_peft_logits(model, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    save_model(model, tmp_path / "hf", format="hf")
    written = {}
    for name, targets, rslora in (("a", ["q_proj", "k_proj", "down_proj"], True), ("b", ["v_proj", "up_proj"], False)):
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
        pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_rslora=rslora))
        g = torch.Generator().manual_seed(len(written))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        pm.save_pretrained(tmp_path / name)
        written[name] = tmp_path / name
    served = copy.deepcopy(model)
    adapters = load_adapters(served, written)
    x = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))
    for name in ("a", "b"):
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
        want = PeftModel.from_pretrained(hf, written[name]).eval()
        with torch.inference_mode():
            adapters.select([name, name])
            torch.testing.assert_close(served(x), want(x).logits, rtol=1e-4, atol=1e-4)


def _config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, message", [
    ({"use_dora": True}, "DoRA"),
    ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"r": 8}, "disagree with r = 8"),
])
def test_unsupported_adapters_are_refused_by_name(model, tmp_path, changes, message):
    path = write_adapter(model, tmp_path / "ad", ["wq"], 4, 8.0, seed=0)
    _config(path, **changes)
    with pytest.raises(ValueError, match=message):
        read_adapter(path, model.args)


def test_adapters_of_another_base_are_refused(model, tmp_path):
    from herd.model import ModelArgs, build_model

    wider = build_model(_with(ModelArgs.from_name("debug"), dim=128), seed=0)
    path = write_adapter(wider, tmp_path / "w", ["wv"], 4, 8.0, seed=0)
    with pytest.raises(ValueError, match="maps 128 -> 64 features but this base model's maps 64 -> 32"):
        read_adapter(path, model.args)
    deeper = build_model(_with(ModelArgs.from_name("debug"), n_layers=3), seed=0)
    path = write_adapter(deeper, tmp_path / "d", ["wv"], 4, 8.0, seed=0)
    with pytest.raises(ValueError, match="layers.2.attention.wv, which this base model"):
        read_adapter(path, model.args)
    with pytest.raises(FileNotFoundError, match="adapter_config.json does not exist"):
        read_adapter(tmp_path / "nowhere", model.args)


def _with(args, **changes):
    import dataclasses

    return dataclasses.replace(args, **changes)


def test_attach_refuses_duplicates_and_a_second_attach(model, two_adapters):
    served = copy.deepcopy(model)
    x = read_adapter(two_adapters["x"], served.args)
    with pytest.raises(ValueError, match="unique"):
        attach_adapters(served, [x, x])
    attach_adapters(served, [x])
    assert isinstance(served.layers["0"].attention.wq, MultiLoRALinear)
    assert type(served.layers["0"].feed_forward.w1) is nn.Linear  # not targeted: untouched
    with pytest.raises(ValueError, match="attached already"):
        attach_adapters(served, [x])
    with pytest.raises(ValueError, match=r"unknown LoRA adapters \['q'\]; attached: x"):
        load_adapters(copy.deepcopy(model), {"x": two_adapters["x"]}).select(["x", "q"])
