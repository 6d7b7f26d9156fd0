"""`herd quantize` and `herd eval perplexity` on a tiny checkpoint with the real Llama 3 vocabulary."""

from __future__ import annotations

import json

import pytest
import torch

import herd
from herd.cli import main
from herd.eval.perplexity import perplexity
from herd.model import ModelArgs, build_model
from herd.quant import Int4Linear, Int8Linear, load_quantized
from herd.tokenizer import Tokenizer, llama3_tokenizer_path

TEXT = "Llamas are domesticated South American camelids, widely used as meat and pack animals. " * 6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    args = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=64,
                     max_seq_len=256, tie_embeddings=True)
    path = tmp_path_factory.mktemp("qcli") / "hf"
    herd.save_model(build_model(args, seed=5), path, format="hf")
    return path


def test_quantize_writes_a_loadable_checkpoint(ckpt, tmp_path, capsys):
    assert main(["quantize", str(ckpt), str(tmp_path / "q"), "--scheme", "int4", "--group-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "quantized 22 linear layers to int4 (output head: int8)" in out  # 3 blocks x 7 + the head
    cfg = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    assert cfg["scheme"] == "int4" and cfg["group_size"] == 32 and cfg["head"] == "int8"
    loaded = load_quantized(tmp_path / "q")
    assert loaded.layers["0"].feed_forward.w1.group_size == 32 and isinstance(loaded.output, Int8Linear)
    assert main(["generate", str(tmp_path / "q"), "--prompt", "Hi", "--max-new-tokens", "2",
                 "--temperature", "0"]) == 0


def test_quantize_with_int8_activations_is_recorded_and_stays_close(ckpt, tmp_path, capsys):
    assert main(["quantize", str(ckpt), str(tmp_path / "exact"), "--scheme", "int8"]) == 0
    assert main(["quantize", str(ckpt), str(tmp_path / "a8"), "--scheme", "int8", "--activations", "int8"]) == 0
    assert json.loads((tmp_path / "a8" / "quant_config.json").read_text())["activations"] == "int8"
    exact, a8 = load_quantized(tmp_path / "exact").eval(), load_quantized(tmp_path / "a8").eval()
    x = torch.tensor([[1, 5, 9]])
    with torch.no_grad():
        # Decode-sized calls take the kernels; activations rounded to 8 bits per block of 32 move
        # the logits a little, never a lot.
        diff = (exact(x)[:, -1] - a8(x)[:, -1]).abs().max().item()
    assert diff < 0.1
    from herd.kernels import cpu_kernels

    if cpu_kernels() is not None:
        assert diff > 0  # the recorded mode is the one that ran
    capsys.readouterr()


@pytest.mark.parametrize(("head", "kind"), [("same", "Int4Linear"), ("float", "Linear")])
def test_quantize_head_flag(ckpt, tmp_path, capsys, head, kind):
    assert main(["quantize", str(ckpt), str(tmp_path / "q"), "--scheme", "int4", "--group-size", "32",
                 "--head", head]) == 0
    assert f"(output head: {'int4' if head == 'same' else 'float'})" in capsys.readouterr().out
    model = load_quantized(tmp_path / "q")
    assert type(model.output).__name__ == kind and isinstance(model.layers["2"].attention.wo, Int4Linear)
    if head == "float":
        assert model.output.weight is model.tok_embeddings.weight  # the checkpoint is tied


def test_quantize_user_errors(ckpt, tmp_path, capsys):
    assert main(["quantize", str(ckpt), str(tmp_path / "q"), "--scheme", "int4", "--group-size", "48"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "q"), "--scheme", "int8"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["quantize", str(ckpt), str(tmp_path / "q"), "--scheme", "fp8", "--head", "int8"]) == 2
    assert "never quantizes the output head" in capsys.readouterr().err


def test_eval_perplexity_reports_each_scheme(ckpt, tmp_path, capsys):
    text_file = tmp_path / "t.txt"
    text_file.write_text(TEXT)
    assert main(["eval", "perplexity", str(ckpt), "--text", str(text_file), "--schemes", "int8", "fp8",
                 "--seq-len", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["scheme"]: r for r in report["rows"]}
    assert list(rows) == ["none", "int8", "fp8"]
    # The float row is the library's number on the same tokens.
    tok = Tokenizer.from_file(llama3_tokenizer_path())
    ref = perplexity(herd.load_model(ckpt, dtype=torch.float32).eval(), TEXT, tokenizer=tok, seq_len=64)
    assert rows["none"]["perplexity"] == pytest.approx(ref.perplexity, rel=1e-6)
    assert rows["none"]["bits_per_byte"] == pytest.approx(ref.bits_per_byte, rel=1e-6)
    assert rows["none"]["delta_perplexity"] is None
    assert rows["int8"]["delta_perplexity"] != 0 and abs(rows["int8"]["delta_perplexity"]) < 0.05
    assert main(["eval", "perplexity", str(ckpt), "--text", str(text_file), "--seq-len", "64"]) == 0
    assert "bits/byte" in capsys.readouterr().out


def test_compare_schemes_passes_the_head_choice(ckpt):
    from herd.eval.perplexity import compare_schemes

    rows = {head: compare_schemes(ckpt, TEXT, schemes=["int4"], head=head, seq_len=64)[1].result.perplexity
            for head in (None, "same", "float")}
    assert len(set(rows.values())) == 3  # int8, int4 and float heads score differently
