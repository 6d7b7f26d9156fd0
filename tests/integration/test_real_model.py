"""The real trained model (SmolLM2-135M-Instruct, GGUF) through herd's commands, checked against
transformers and llama.cpp: what a user does first with a model file they hold.

* `herd info` reads the GGUF header; `herd generate --chat` answers with the checkpoint's own
  ChatML template and stops at its end-of-turn token.
* `herd convert` GGUF -> HF directory: transformers loads it (tokenizer, chat template, config)
  and computes herd's logits; the folder has the usual permissions, not mkdtemp's 0700.
* `herd convert` HF -> GGUF Q8_0: llama.cpp (in its own process) loads the file, tokenizes
  like herd and computes logits close to herd's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from herd.cli import main
from herd.generate.loading import load_for_inference
from herd.tokenizer import Message

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return load_for_inference(smollm2_gguf, cpu_kernels=False)


def test_info_and_chat_answer(smollm2_gguf, capsys):
    assert main(["info", str(smollm2_gguf), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "gguf" and info["num_params"] == 134_515_008
    assert main(["generate", str(smollm2_gguf), "--chat", "--prompt", QUESTION, "--temperature", "0",
                 "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr()
    assert "Paris" in out.out
    assert "finish: stop" in out.err  # stopped at <|im_end|>, the GGUF's eos, not at the token limit


@pytest.fixture(scope="module")
def hf_copy(smollm2_gguf, tmp_path_factory):
    dst = tmp_path_factory.mktemp("convert") / "smol-hf"
    assert main(["convert", str(smollm2_gguf), str(dst), "--to", "hf"]) == 0
    return dst


def test_gguf_to_hf_loads_in_transformers(hf_copy, smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    umask = os.umask(0)
    os.umask(umask)
    for path in [hf_copy, *hf_copy.iterdir()]:  # not mkdtemp's 0700 / safetensors' 0600
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(os.stat(path).st_mode) == want, (path.name, oct(os.stat(path).st_mode))
    tok = AutoTokenizer.from_pretrained(hf_copy)
    dialog = [{"role": "user", "content": QUESTION}]
    ids = tok.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    herd_ids = smol.chat.encode_dialog_prompt([Message(role="user", content=QUESTION)]).tokens
    assert list(ids) == herd_ids
    assert tok.eos_token == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(hf_copy, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = model(torch.tensor([herd_ids])).logits[0]
        got = smol.model(torch.tensor([herd_ids]))[0]
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_hf_to_gguf_runs_in_llamacpp(hf_copy, smol, tmp_path):
    dst = tmp_path / "smol-q8.gguf"
    assert main(["convert", str(hf_copy), str(dst), "--to", "gguf", "--qtype", "Q8_0"]) == 0
    herd_ids = smol.chat.encode_dialog_prompt([Message(role="user", content=QUESTION)]).tokens
    script = (
        "import json, sys\n"
        "import numpy as np\n"
        "from llama_cpp import Llama\n"
        "llm = Llama(model_path=sys.argv[1], n_ctx=256, logits_all=True, verbose=False, n_threads=2)\n"
        "ids = json.loads(sys.argv[2])\n"
        "llm.eval(ids)\n"
        "np.save(sys.argv[3], np.asarray(llm.scores[: len(ids)], dtype=np.float32))\n"
        "text = '<|im_start|>user\\nWhat is the capital of France?<|im_end|>\\n'\n"
        "print(json.dumps(llm.tokenize(text.encode(), add_bos=False, special=True)))\n"
    )
    out = tmp_path / "logits.npy"
    proc = subprocess.run([sys.executable, "-c", script, str(dst), json.dumps(herd_ids), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = f"<|im_start|>user\n{QUESTION}<|im_end|>\n"
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == smol.tokenizer.encode(
        text, bos=False, eos=False, allowed_special="all")
    import numpy as np

    theirs = torch.from_numpy(np.load(out))
    same_weights = load_for_inference(dst, cpu_kernels=False)  # herd reading the Q8_0 file it wrote
    with torch.inference_mode():
        ours = same_weights.model(torch.tensor([herd_ids]))[0]
    # Same weights; llama.cpp also rounds activations to 8 bits and keeps the KV cache in F16.
    # Measured on this prompt: mean relative error 0.04, max 0.16 (herd F32 file vs llama.cpp F32:
    # max 0.005), so the bounds leave about 2x room; a wrong tensor or q/k order gives ~1.
    rel = (theirs - ours).norm(dim=-1) / ours.norm(dim=-1)
    assert rel.mean().item() < 0.08 and rel.max().item() < 0.3, rel
    top2 = ours.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1.0
    assert clear.sum() > len(herd_ids) // 3
    assert (theirs.argmax(-1) == ours.argmax(-1))[clear].all()


def test_convert_refuses_an_existing_destination(hf_copy, smollm2_gguf, capsys):
    assert main(["convert", str(smollm2_gguf), str(hf_copy), "--to", "hf"]) == 2
    assert "already exists" in capsys.readouterr().err
