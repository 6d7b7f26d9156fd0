"""lm-eval's `local-completions` model scoring against a running herd server, checked against
herd's own multiple-choice scorer on the same model and items.

lm-eval scores a choice by sending context + continuation as token ids with `echo: true`,
`logprobs: 1` and `max_tokens: 1`, and summing the echoed prompt logprobs after the context. Two
tokenizer paths are exercised:
* the HF tokenizer files herd exports, with `add_bos_token=True`: the same tokens herd's
  `evaluate_mc` scores (BOS + context, then the choice), so every log-likelihood and both
  accuracies must agree;
* no local tokenizer at all: lm-eval finds `/tokenizer_info` and tokenizes through the server's
  `/tokenize` (vLLM's "remote" backend). That path adds no BOS, so it is compared with herd's
  scorer on the contexts without BOS.
"""

import json

import pytest
import torch

from herd.eval.multiple_choice import build_prompt, evaluate_mc, format_continuation, load_mc_jsonl
from herd.eval.scoring import score_continuations
from herd.tokenizer import Tokenizer, llama3_tokenizer_path
from tests.helpers import real_vocab_model, served

pytest.importorskip("lm_eval.evaluator")  # the full harness (datasets, evaluate, ...): the lm-eval extra
pytest.importorskip("tenacity")  # lm-eval's API models (lm-eval[api])

CONTEXT = 128
ITEMS = [
    {"question": "What do llamas eat?", "choices": ["grass", "fish", "rocks"], "answer": 0},
    {"question": "Where are llamas from?", "choices": ["the Andes", "the Alps"], "answer": 0},
    {"question": "Sky colour?", "choices": ["green", "blue"], "answer": 1},
    {"question": "Legs of a llama?", "choices": ["two", "four", "six"], "answer": 1},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(llama3_tokenizer_path())


@pytest.fixture(scope="module")
def model():
    return real_vocab_model(seed=11, context=CONTEXT)


@pytest.fixture(scope="module")
def server(model, tok):
    with served(model, tok, max_queue=64, max_seq_len=CONTEXT) as srv:
        yield srv


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_task")
    data = root / "llamas.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in ITEMS) + "\n")
    (root / "tasks").mkdir()
    (root / "tasks" / "herd_llamas.yaml").write_text(f"""task: herd_llamas
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return root


def _run(server, task, monkeypatch, **model_args):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = {"model": "tiny", "base_url": server.url + "/v1/completions", "max_length": CONTEXT, "max_retries": 1,
            **model_args}
    out = simple_evaluate(model="local-completions", model_args=args, tasks=["herd_llamas"], num_fewshot=0,
                          task_manager=TaskManager(include_path=str(task / "tasks")), log_samples=True)
    samples = sorted(out["samples"]["herd_llamas"], key=lambda s: s["doc_id"])
    # One (loglikelihood, is_greedy) per choice, per item.
    lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    return out["results"]["herd_llamas"], lls


@pytest.mark.slow
def test_local_completions_with_herds_tokenizer_files_equals_evaluate_mc(model, tok, server, task, tmp_path,
                                                                          monkeypatch):
    pytest.importorskip("transformers")
    from herd.tokenizer.export import tokenizer_files

    for name, data in tokenizer_files(llama3_tokenizer_path(), model_max_length=CONTEXT).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    metrics, lls = _run(server, task, monkeypatch, tokenizer_backend="huggingface", tokenizer=str(tmp_path),
                        add_bos_token=True)
    direct = evaluate_mc(model, tok, load_mc_jsonl(task / "llamas.jsonl"))
    want = [p.logprobs for p in direct.predictions]
    torch.testing.assert_close(torch.tensor(sum(lls, [])), torch.tensor(sum(want, [])), atol=1e-4, rtol=0)
    assert metrics["acc,none"] == direct.accuracy and metrics["acc_norm,none"] == direct.accuracy_norm


@pytest.mark.slow
def test_local_completions_through_the_servers_own_tokenizer(model, tok, server, task, monkeypatch):
    metrics, lls = _run(server, task, monkeypatch)  # tokenizer_backend "auto": finds /tokenizer_info
    requests = [(tok.encode(build_prompt(_mc(x)), bos=False, eos=False),
                 tok.encode(format_continuation(c), bos=False, eos=False)) for x in ITEMS for c in x["choices"]]
    want = [s.logprob for s in score_continuations(model, requests)]
    torch.testing.assert_close(torch.tensor(sum(lls, [])), torch.tensor(want), atol=1e-4, rtol=0)
    assert 0 <= metrics["acc,none"] <= 1


def _mc(item):
    from herd.eval.multiple_choice import parse_mc_example

    return parse_mc_example(item, where="item")
