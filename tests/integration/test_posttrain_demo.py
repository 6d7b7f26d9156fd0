"""The post-training demo stage, shrunk to a few steps on a tiny model (the real run takes ~3 min)."""

import base64
import json

import pytest
import torch

from herd.model import ModelArgs, build_model
from herd.posttrain.config import FinetuneOptimConfig
from herd.posttrain.demo import SHOW_PROMPTS, DemoConfig, run_posttrain_demo
from herd.posttrain.io import save_checkpoint

pytest.importorskip("yaml")


def test_demo_stage_runs_and_reports(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = tmp_path / "bytes.model"
        tok.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
        args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16,
                         ffn_dim_multiplier=1.0, max_seq_len=512)
        save_checkpoint(build_model(args, seed=0), tmp_path / "base", tokenizer=tok)
        cfg = DemoConfig(max_tokens=160, seq_len=192, sft=FinetuneOptimConfig(lr=1e-3, steps=3, batch_size=2),
                         dpo=FinetuneOptimConfig(lr=1e-4, steps=2, batch_size=2), train_pairs=8, held_out_pairs=8,
                         max_new_tokens=3)
        lines: list[str] = []
        report = run_posttrain_demo(tmp_path / "base", tmp_path / "out", config=cfg, log=lines.append)
    finally:
        torch.set_num_threads(threads)
    assert report["sft_steps"] == 3 and report["dpo_steps"] == 2
    assert [a["prompt"] for a in report["answers"]] == list(SHOW_PROMPTS)
    assert set(report["held_out_logprob_accuracy"]) == {"base", "sft", "dpo"}
    assert 0.0 <= report["held_out_reward_accuracy_dpo"] <= 1.0
    assert json.loads((tmp_path / "out" / "posttrain_demo.json").read_text())["sft_steps"] == 3
    for name in ("chat_train.jsonl", "chat_heldout.jsonl", "pairs_train.jsonl", "pairs_heldout.jsonl",
                 "sft/original/tokenizer.model", "sft/tokenizer.json", "dpo/config.json"):
        assert (tmp_path / "out" / name).is_file(), name
    assert any("Held-out preference accuracy" in line for line in lines)
