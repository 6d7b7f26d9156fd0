"""`herd vision-adapter` on a tiny random text model: the whole recipe end to end, and its usage errors."""

import base64
import json

import pytest
import torch

import herd
from herd.cli import main
from herd.generate.vision import load_vision_for_inference
from herd.model import ModelArgs, build_model

pytest.importorskip("PIL")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: a second thread only adds OpenMP barriers
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vis") / "text-hf"
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, max_seq_len=256)
    herd.save_model(build_model(args, seed=3).eval(), path, format="hf")
    (path / "tokenizer.model").write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return path


def test_vision_adapter_trains_reports_and_saves(text_dir, tmp_path, capsys):
    out = tmp_path / "adapter"
    code = main(["vision-adapter", "--text-model", str(text_dir), "--out", str(out), "--caption-steps", "3",
                 "--qa-steps", "2", "--train-pictures", "8", "--eval-pictures", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "text model weights unchanged: yes" in printed
    assert "<|image|> = id 512" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["text_unchanged"] is True
    assert [s["steps"] for s in report["stages"]] == [3, 2]
    # the saved checkpoint opens for inference with the text model's tokenizer, and its text weights
    # are the text model's
    loaded = load_vision_for_inference(out / "model")
    assert loaded.tokenizer.n_words == 512
    text = herd.load_model(text_dir)
    assert torch.equal(loaded.model.text_model.layers["1"].attention.wq.weight, text.layers["1"].attention.wq.weight)


@pytest.mark.parametrize("argv, message", [
    (["--text-model", "{missing}"], "does not exist"),
    (["--text-model", "{text}", "--caption-steps", "-1"], "--caption-steps must be >= 0"),
    (["--text-model", "{text}", "--eval-pictures", "0"], "--eval-pictures must be >= 1"),
    (["--text-model", "{text}", "--out", "{existing}"], "exists"),
])
def test_vision_adapter_usage_errors_exit_2(text_dir, tmp_path, capsys, argv, message):
    (tmp_path / "existing").mkdir()
    fill = dict(missing=str(tmp_path / "nope"), text=str(text_dir), existing=str(tmp_path / "existing"))
    argv = [a.format(**fill) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "new")]
    assert main(["vision-adapter", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
