"""`herd sft|rm|rs|dpo|distill|prune` end to end on a tiny model, through the shipped configs."""

import base64
import json
from pathlib import Path

import pytest
import torch

from herd.cli import main
from herd.model import ModelArgs, build_model, load_model
from herd.posttrain.data import PreferencePair, write_chat_jsonl, write_preference_jsonl
from herd.posttrain.io import save_checkpoint
from herd.tokenizer import Message

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: a second thread only adds contention on a busy 2-core box
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("posttrain")
    tok = root / "bytes.model"  # 256 byte ranks; the tokenizer adds the 256 special tokens
    tok.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16,
                     ffn_dim_multiplier=1.0, max_seq_len=512)
    save_checkpoint(build_model(args, seed=0), root / "base", tokenizer=tok)
    dialogs = [[Message("user", f"What is {i} plus one?"), Message("assistant", f"It is {i + 1}.")] for i in range(24)]
    write_chat_jsonl(root / "chat.jsonl", dialogs)
    write_chat_jsonl(root / "prompts.jsonl", [d[:1] for d in dialogs[:3]])
    pairs = [PreferencePair(d[:1], d[1], Message("assistant", "No idea."),
                            edited=Message("assistant", f"{d[1].content} Easy.") if i % 3 == 0 else None)
             for i, d in enumerate(dialogs)]
    write_preference_jsonl(root / "pairs.jsonl", pairs)
    return root


def _run(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def _common(work: Path, name: str, *, steps: int = 3) -> list[str]:
    return ["--model.path", str(work / "base"), "--output.dir", str(work / name), "--optim.steps", str(steps),
            "--optim.batch_size", "4", "--optim.warmup_steps", "0", "--output.log_every", "1"]


def test_sft_full_and_qlora(work, capsys):
    out = _run(capsys, "sft", str(CONFIGS / "posttrain_sft.toml"), *_common(work, "sft"),
               "--data.train", str(work / "chat.jsonl"), "--data.seq_len", "64")
    assert "final loss" in out and (work / "sft" / "model" / "original" / "tokenizer.model").is_file()
    assert json.loads((work / "sft" / "sft_metrics.json").read_text())["steps"] == 3
    load_model(work / "sft" / "model")
    _run(capsys, "sft", str(CONFIGS / "posttrain_sft.toml"), *_common(work, "qlora"),
         "--data.train", str(work / "chat.jsonl"), "--data.seq_len", "64", "--lora.rank", "4",
         "--lora.quantize_base", "true", "--optim.lr", "1e-3")
    assert (work / "qlora" / "adapter" / "adapter_config.json").is_file()
    assert load_model(work / "qlora" / "model").args.dim == 32  # merged and dequantised


def test_rm_then_rs(work, capsys):
    out = _run(capsys, "rm", str(CONFIGS / "posttrain_rm.toml"), *_common(work, "rm"),
               "--data.train", str(work / "pairs.jsonl"))
    assert "val_accuracy" in out
    out = _run(capsys, "rs", str(CONFIGS / "posttrain_rs.toml"), "--model.path", str(work / "base"),
               "--output.dir", str(work / "rs"), "--rs.prompts", str(work / "prompts.jsonl"),
               "--rs.reward_model", str(work / "rm"), "--rs.k", "2", "--rs.max_new_tokens", "4")
    report = json.loads((work / "rs" / "rs_metrics.json").read_text())
    assert report["prompts"] == 3 and (work / "rs" / "rs.jsonl").is_file()


def test_dpo_with_and_without_precomputed_reference(work, capsys):
    for precompute in ("true", "false"):
        out = _run(capsys, "dpo", str(CONFIGS / "posttrain_dpo.toml"), *_common(work, f"dpo-{precompute}"),
                   "--data.train", str(work / "pairs.jsonl"), "--dpo.precompute_reference", precompute)
        assert "val_reward_accuracy" in out
    a = json.loads((work / "dpo-true" / "dpo_metrics.json").read_text())
    b = json.loads((work / "dpo-false" / "dpo_metrics.json").read_text())
    assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-4)  # same reference either way


def test_prune_then_distill(work, capsys):
    out = _run(capsys, "prune", str(CONFIGS / "posttrain_prune.toml"), *_common(work, "prune"),
               "--data.train", str(work / "chat.jsonl"), "--data.seq_len", "64", "--prune.n_layers", "1",
               "--prune.ffn_hidden_dim", "32", "--prune.n_heads", "2")
    assert "params_after" in out
    pruned = load_model(work / "prune" / "model")
    assert (pruned.args.n_layers, pruned.args.n_heads, pruned.args.ffn_hidden_dim) == (1, 2, 32)
    out = _run(capsys, "distill", str(CONFIGS / "posttrain_distill.toml"), *_common(work, "distill"),
               "--model.path", str(work / "prune" / "model"), "--distill.teacher", str(work / "base"),
               "--data.train", str(work / "chat.jsonl"), "--data.seq_len", "64", "--distill.top_k", "8")
    assert "final_kl" in out and (work / "distill" / "model" / "config.json").is_file()


def test_user_errors_exit_2(work, capsys):
    assert main(["sft", str(CONFIGS / "posttrain_sft.toml"), "--optim.nope", "1"]) == 2
    assert "unknown key" in capsys.readouterr().err
    bad = work / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{oops\n')
    assert main(["sft", str(CONFIGS / "posttrain_sft.toml"), *_common(work, "bad"), "--data.train", str(bad)]) == 2
    assert "bad.jsonl:2:" in capsys.readouterr().err
