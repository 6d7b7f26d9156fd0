"""The CLI's own behaviour: --version, defaults in --help, device choice, refusing existing outputs.

Each user error must be one line on stderr with exit status 2 and no traceback, and must leave
what was already on disk as it was.
"""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import herd
from herd.cli import main
from herd.cli.common import resolve_device, resolve_dtype
from herd.model import ModelArgs, build_model

ROOT = Path(__file__).resolve().parents[2]


def _one_line_error(capsys, command: str, *needles: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err and len(err.splitlines()) == 1, captured.err
    assert err.startswith(f"herd {command}: error:"), err
    for needle in needles:
        assert needle in err, err
    return err


def test_version_is_pyproject_version():
    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    proc = subprocess.run([sys.executable, "-m", "herd", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"herd {want}\n"


def test_help_shows_defaults(capsys):
    assert main(["generate", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    options = out[out.index("options:"):]  # past the usage line, which names every option too
    for option, default in [("--temperature", "0.6"), ("--top-p", "0.9"), ("--max-new-tokens", "256"),
                            ("--device", "auto"), ("--dtype", "auto")]:
        entry = options[options.index(f" {option} "):]
        entry = entry[: entry.index(" --", 2)]  # up to the next option
        assert f"(default: {default})" in entry, (option, entry)
    assert "(default: None)" not in out and "(default: False)" not in out
    assert main(["quantize", "--help"]) == 0
    assert "(default: 32)" in capsys.readouterr().out  # --group-size


def test_auto_device_is_cuda_bf16_only_when_torch_sees_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("fp16", "cpu") == torch.float16  # an explicit dtype is kept


def test_unusable_or_unknown_device_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x", "--device", "cuda"]) == 2
    _one_line_error(capsys, "generate", "--device cuda", "--device cpu")
    assert main(["eval", "mc", str(tmp_path / "missing"), "--task", "t.jsonl", "--device", "gpu0"]) == 2
    _one_line_error(capsys, "eval mc", "unknown device 'gpu0'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use CUDA")
def test_device_cuda_on_cpu_torch_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "herd", "chat", str(tmp_path), "--device", "cuda"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("herd chat: error: --device cuda:") and len(proc.stderr.splitlines()) == 1


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32, max_seq_len=64,
                     tie_embeddings=True)  # the Llama 3 vocabulary: convert finds its tokenizer
    path = tmp_path_factory.mktemp("src") / "hf"
    herd.save_model(build_model(args, seed=0), path, format="hf")
    return path


def _existing_dir(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_bytes(b"do not touch")
    return out, {"keep.txt": b"do not touch"}


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("command", [
    ["quantize", "{src}", "{out}", "--scheme", "int8"],
    ["convert", "{src}", "{out}", "--to", "hf"],
    ["export", "{src}", "{out}"],
])
def test_existing_output_directory_is_refused_and_left_alone(command, ckpt, tmp_path, capsys):
    out, before = _existing_dir(tmp_path)
    argv = [a.format(src=ckpt, out=out) for a in command]
    assert main(argv) == 2
    _one_line_error(capsys, command[0], str(out), "already exists", "--overwrite")
    assert _contents(out) == before


@pytest.mark.parametrize("command", [
    ["tokenizer", "train", "--sources", "austen", "--out", "{out}"],
    ["data", "train-classifier", "--example", "a=wiki-en", "--example", "b=austen", "--out", "{out}"],
])
def test_existing_tokenizer_or_classifier_file_is_refused_and_left_alone(command, tmp_path, capsys):
    out = tmp_path / "model.bin"
    out.write_bytes(b"an older file")
    assert main([a.format(out=out) for a in command]) == 2
    _one_line_error(capsys, " ".join(command[:2]), "already exists", "--overwrite")
    assert out.read_bytes() == b"an older file"


def test_existing_gguf_file_is_refused_and_left_alone(ckpt, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"an older file")
    assert main(["convert", str(ckpt), str(out), "--to", "gguf"]) == 2
    _one_line_error(capsys, "convert", "already exists")
    assert out.read_bytes() == b"an older file"


def test_overwrite_replaces_an_existing_output(ckpt, tmp_path, capsys):
    out, _ = _existing_dir(tmp_path)
    assert main(["convert", str(ckpt), str(out), "--to", "meta", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists()
    for k, v in herd.load_model(ckpt).state_dict().items():
        assert torch.equal(v, herd.load_model(out).state_dict()[k]), k


def test_print_config_is_the_resolved_config_and_reads_back_equal(tmp_path, capsys):
    from herd.posttrain.config import SFTConfig
    from herd.posttrain.config import load_config as load_posttrain
    from herd.train.config import load_config

    assert main(["train", str(ROOT / "configs/debug.toml"), "--optim.lr", "1e-3", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert tomllib.loads(printed)["optim"]["lr"] == 1e-3  # the override is in it
    (tmp_path / "train.toml").write_text(printed)
    assert load_config(tmp_path / "train.toml") == load_config(ROOT / "configs/debug.toml", ["--optim.lr", "1e-3"])

    sft = ROOT / "configs/posttrain_smollm2_lora.toml"
    assert main(["sft", str(sft), "--print-config", "--lora.rank", "4"]) == 0
    (tmp_path / "sft.toml").write_text(capsys.readouterr().out)
    assert load_posttrain(SFTConfig, tmp_path / "sft.toml") == load_posttrain(SFTConfig, sft, ["--lora.rank", "4"])


def test_train_help_lists_every_config_section_and_key(capsys):
    import dataclasses

    from herd.train.config import Config

    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(Config):
        assert f"[{f.name}]" in out or f"[[{f.name}]]" in out, f.name
    assert "micro_batch_tokens = 0  (int)" in out and "lr = 0.0003  (float)" in out


def test_serve_accepts_vllms_flag_names():
    from herd.cli import build_parser

    ours = build_parser().parse_args(["serve", "ckpt", "--max-batch", "3", "--max-seq-len", "512", "--model-name", "m"])
    vllm = build_parser().parse_args(["serve", "ckpt", "--max-num-seqs", "3", "--max-model-len", "512",
                                      "--served-model-name", "m"])
    assert (vllm.max_batch, vllm.max_seq_len, vllm.model_name) == (ours.max_batch, ours.max_seq_len,
                                                                  ours.model_name) == (3, 512, "m")
    assert build_parser().parse_args(["serve", "ckpt"]).max_batch == 8
