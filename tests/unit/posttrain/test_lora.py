import importlib.util

import pytest
import torch

from herd.model import save_model
from herd.posttrain.lora import (
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_disabled,
    lora_parameters,
    merge_lora,
    model_bytes,
    save_adapter,
)

ALL = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def _randomise_adapters(model, std=0.05):
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=std)


def test_fresh_adapters_leave_the_model_unchanged(tiny_model):
    x = torch.randint(0, 512, (2, 11))
    for rank in (0, 4):
        model = tiny_model()
        with torch.no_grad():
            before = model(x)
        apply_lora(model, ALL, rank, 8.0)
        with torch.no_grad():
            assert torch.equal(model(x), before)  # B = 0 (or no rank at all): bit-identical


def test_only_adapters_train(tiny_model):
    model = tiny_model()
    spec = apply_lora(model, ["wq", "wv"], 4, 8.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{ab}" for m in spec.modules for ab in ("lora_a", "lora_b")}
    assert len(spec.modules) == 2 * model.args.n_layers
    assert model.layers["0"].attention.wq.weight.shape == (32, 32)  # base keeps its Meta name


def test_merged_equals_unmerged_and_disabled_equals_base(tiny_model):
    model = tiny_model(tie_embeddings=False)
    x = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        base = model(x)
    apply_lora(model, ALL + ["output"], 4, 8.0)
    _randomise_adapters(model)
    with torch.no_grad():
        adapted = model(x)
        with lora_disabled(model):
            torch.testing.assert_close(model(x), base, rtol=0, atol=0)
    assert (adapted - base).abs().max() > 1e-3  # the adapters do something
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(tiny_model(tie_embeddings=False).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)


def test_tied_output_cannot_take_an_adapter(tiny_model):
    with pytest.raises(ValueError, match="untie"):
        apply_lora(tiny_model(tie_embeddings=True), ["output"], 4, 8.0)
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        apply_lora(tiny_model(), ["q_proj"], 4, 8.0)


def test_adapter_files_round_trip(tiny_model, tmp_path):
    model = tiny_model()
    apply_lora(model, ALL, 4, 8.0)
    _randomise_adapters(model)
    save_adapter(model, tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    other = tiny_model()
    load_adapter(other, tmp_path / "ad")
    x = torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


@pytest.mark.skipif(importlib.util.find_spec("peft") is None or importlib.util.find_spec("transformers") is None,
                    reason="peft and transformers are optional")
def test_adapters_load_in_peft_with_the_same_logits(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = tiny_model(tie_embeddings=False).eval()
    save_model(model, tmp_path / "hf", format="hf")
    apply_lora(model, ALL + ["output"], 4, 8.0)
    _randomise_adapters(model)
    save_adapter(model, tmp_path / "ad")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    x = torch.randint(0, 512, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, model(x), rtol=1e-5, atol=1e-5)


def test_qlora_holds_fewer_bytes_than_lora(tiny_model):
    lora, qlora = tiny_model(dim=128, n_heads=4, n_kv_heads=2), tiny_model(dim=128, n_heads=4, n_kv_heads=2)
    apply_lora(lora, ALL, 8, 16.0)
    apply_lora(qlora, ALL, 8, 16.0, quantize_base=True)
    block = lambda m: sum(model_bytes(layer) for layer in m.layers.values())  # noqa: E731
    # The block linears shrink from 32 to ~4.13 bits per weight; the adapters are the same.
    assert block(qlora) < 0.25 * block(lora)
    assert model_bytes(qlora) < model_bytes(lora)
    x = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        assert (qlora(x) - lora(x)).abs().max() < 0.5  # NF4 base: close, not equal
    # Gradients reach the adapters through the NF4 base.
    _randomise_adapters(qlora)
    qlora(x).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(qlora))
    merge_lora(qlora)  # dequantised into an ordinary fp32 model
    assert qlora.layers["0"].attention.wq.weight.dtype == torch.float32
