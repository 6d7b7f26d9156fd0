"""Each CLI command on a tiny checkpoint with the real Llama 3 vocabulary, checked against the library."""

import json
import math
import subprocess
import sys

import pytest
import torch

import herd
from herd.cli import main
from herd.generate import SamplingParams, generate
from herd.model import ModelArgs, build_model
from herd.tokenizer import Tokenizer, llama3_tokenizer_path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
                     max_seq_len=512, rope_scaling=dict(factor=8.0, original_max_seq_len=64))
    model = build_model(args, seed=3).eval()
    path = tmp_path_factory.mktemp("cli") / "hf"
    herd.save_model(model, path, format="hf")
    return path, model


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(llama3_tokenizer_path())


def test_tokenize_golden_vector(capsys):
    assert main(["tokenize", "This is a test sentence.", "--bos", "--eos"]) == 0
    assert capsys.readouterr().out.split() == ["128000", "2028", "374", "264", "1296", "11914", "13", "128001"]


def test_tokenize_special_text_is_plain_unless_allowed(capsys):
    main(["tokenize", "<|eot_id|>"])
    assert capsys.readouterr().out.split() == ["27", "91", "68", "354", "851", "91", "29"]
    main(["tokenize", "<|eot_id|>", "--allow-special"])
    assert capsys.readouterr().out.split() == ["128009"]
    main(["tokenize", "--decode", "128000,2028,374"])
    assert capsys.readouterr().out == "<|begin_of_text|>This is\n"


def test_info_reports_the_checkpoint(ckpt, capsys):
    path, model = ckpt
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "hf" and info["dtype"] == "float32"
    assert info["num_params"] == model.args.num_params()


def test_generate_greedy_matches_the_library(ckpt, tok, capsys):
    path, model = ckpt
    prompt = "Llamas live in"
    assert main(["generate", str(path), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "8",
                 "--ignore-eos"]) == 0
    out = capsys.readouterr()
    [expected] = generate(model, [tok.encode(prompt, bos=True, eos=False)], max_new_tokens=8,
                          sampling=SamplingParams(temperature=0))
    assert out.out == prompt + tok.decode(expected.tokens) + "\n"
    assert "finish: length" in out.err


def test_convert_round_trip_is_identical(ckpt, tmp_path, capsys):
    path, model = ckpt
    assert main(["convert", str(path), str(tmp_path / "meta"), "--to", "meta", "--num-shards", "2"]) == 0
    assert main(["convert", str(tmp_path / "meta"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    back = herd.load_model(tmp_path / "hf")
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_chat_session_over_stdin(ckpt):
    path, _ = ckpt
    proc = subprocess.run(
        [sys.executable, "-m", "herd", "chat", str(path), "--max-new-tokens", "4", "--seed", "0"],
        input="Hello\n/reset\nAgain\n", capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("llama> ") == 2 and "(history cleared)" in proc.stderr


def test_user_errors_are_one_line_with_exit_code_2(ckpt, tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad_tok = tmp_path / "tok.model"
    bad_tok.write_text("not base64 at all\n")
    path, _ = ckpt
    assert main(["generate", str(path), "--prompt", "x", "--tokenizer", str(bad_tok)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("herd generate: error:") and str(bad_tok) in err
    assert main(["generate", str(path), "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_demo_quick_runs_every_stage(tmp_path, capsys):
    """`herd demo --quick`: the whole chain at toy size, from raw corpora to a post-trained model."""
    from herd.demo import run_demo

    report = run_demo(out_dir=tmp_path, quick=True)
    out = capsys.readouterr().out
    assert report["golden_ok"] and report["round_trip"]["logits_identical"]
    # The data went through the curation pipeline, every source came out, and every step's
    # documents add up; the held-out split of each prose source is non-empty and not everything.
    cur = report["curation"]
    assert set(cur["kept"]) == {"web", "wiki", "austen", "code"} and all(cur["kept"].values())
    for st in cur["steps"]:
        assert st["removed"] == sum(st["why"].values())
    assert any(st["step"].startswith("langid") and st["removed"] > 0 for st in cur["steps"])  # fr/de/es pages
    for name, st in report["data"]["sources"].items():
        assert st["docs"] == cur["kept"][name]
        if name in ("wiki", "austen"):  # the validation sources
            assert 0 < st["val_docs"] < st["docs"]
    # Three stages ran in order, the loss fell, the last checkpoints were averaged.
    stages = report["train"]["stages"]
    assert [s["name"] for s in stages] == ["pretrain", "context", "anneal"]
    records = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 0.5
    assert (tmp_path / "train" / "anneal-averaged" / "original" / "tokenizer.model").is_file()
    assert (tmp_path / "train" / "loss.png").stat().st_size > 0
    # Evaluation against the unigram baseline, then the long-context and post-training stages.
    ev = report["eval"]
    assert ev["val_tokens"] > 1000 and 0 < ev["unigram_entropy"] < math.log(4096)
    lc = report["long_context"]
    assert lc["lengths"][-1] == 1024 and (tmp_path / "long_context" / "needle.png").is_file()
    pt = report["posttrain"]
    assert pt["sft_steps"] == 6 and pt["dpo_steps"] == 3
    assert (tmp_path / "posttrain" / "dpo").is_dir()
    # The real model: three precisions scored on the same held-out tokens, a LoRA SFT saved with the
    # GGUF's tokenizer and chat template, answers before and after.
    rm = report["real_model"]
    assert [r["scheme"] for r in rm["quantization"]] == ["fp32", "int8", "int4"]
    assert all(1 < r["perplexity"] < 1000 for r in rm["quantization"])
    assert rm["sft"]["steps"] == 3 and (tmp_path / "smollm2" / "sft" / "model" / "tokenizer.json").is_file()
    assert len(rm["answers"]) == 16 and rm["identity_rate_before"] == 0.0
    # The vision adapter on the frozen demo model: both stages ran, the text weights are bitwise untouched.
    vis = report["vision"]
    assert vis["text_unchanged"] is True and [s["steps"] for s in vis["stages"]] == [4, 3]
    assert vis["image_token"] == 4096 and (tmp_path / "vision-adapter" / "model" / "config.json").is_file()
    assert "text model weights unchanged: yes" in out
    with pytest.raises(ValueError, match="quick"):  # a full run must not reuse a quick run's outputs
        run_demo(out_dir=tmp_path, quick=False)
    for title in ("1. checks", "4. training", "6. long context", "7. post-training", "8. a real model",
                  "9. vision", "what each stage did"):
        assert title in out
    on_disk = json.loads((tmp_path / "demo.json").read_text())
    assert on_disk["quick"] is True and set(on_disk["timings"]) >= {"checks", "training (3 stages)"}


def test_generate_json_schema_output_validates(ckpt, tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    path, _ = ckpt
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "w": {"enum": ["yes", "no"]}},
              "required": ["n", "w"], "additionalProperties": False}
    file = tmp_path / "schema.json"
    file.write_text(json.dumps(schema))
    for seed in range(3):  # a random model at temperature 1: it never writes JSON by itself
        assert main(["generate", str(path), "--prompt", "JSON:", "--json-schema", str(file), "--temperature", "1",
                     "--seed", str(seed), "--max-new-tokens", "40"]) == 0
        out = capsys.readouterr()
        jsonschema.validate(json.loads(out.out), schema)  # stdout is the JSON alone
        assert "finish: stop" in out.err
    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "list.json").write_text("[1]")
    for argv, message in [(["--json-schema", str(tmp_path / "missing.json")], "no file"),
                          (["--json-schema", str(tmp_path / "bad.json")], "not a JSON file"),
                          (["--json-schema", str(tmp_path / "list.json")], "JSON Schema object"),
                          (["--json-schema", str(file), "--ignore-eos"], "--ignore-eos")]:
        assert main(["generate", str(path), "--prompt", "x", *argv]) == 2
        assert message in capsys.readouterr().err
