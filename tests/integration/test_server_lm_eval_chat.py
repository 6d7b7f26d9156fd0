"""lm-eval's `local-chat-completions` model running a generate_until task against herd's
/v1/chat/completions, checked against a plain greedy loop over the same model.

`local-chat-completions` sends the task's prompt as chat messages (with `apply_chat_template`)
together with `max_tokens`, `temperature: 0`, `seed` and the task's `until` strings as a `stop`
list, one request per document, and reads `choices[i].message.content`. The reference here is
independent of the server and the engine: the dialog encoded with the Llama 3.1 chat format,
then a full-sequence forward and argmax per new token (no KV cache), decoded and cut at the
first stop string. lm-eval's recorded responses and its exact_match must agree with it.

A random model says the same thing whatever the question (the prompts end in the same assistant
header), so the stop list is built from what it says: one of its words ends the text early, which
exercises the `stop` field end to end (lm-eval cuts at the same strings again on its side).
"""

import json

import pytest
import torch

from herd.tokenizer import ChatFormat, Message, Tokenizer, llama3_tokenizer_path
from tests.helpers import real_vocab_model, served

pytest.importorskip("lm_eval.evaluator")  # the full harness (datasets, evaluate, ...): the lm-eval extra
pytest.importorskip("tenacity")  # lm-eval's API models (lm-eval[api])

CONTEXT = 128
MAX_GEN = 6
DOCS = [
    {"question": "Name a llama's food.", "answer": "grass"},
    {"question": "Where do llamas live?", "answer": "the Andes"},
    {"question": "Say hi.", "answer": "hi"},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_file(llama3_tokenizer_path())


@pytest.fixture(scope="module")
def model():
    return real_vocab_model(seed=5, context=CONTEXT)


@pytest.fixture(scope="module")
def server(model, tok):
    with served(model, tok, max_batch=2, max_seq_len=CONTEXT, chat="3.1") as srv:
        yield srv


def _task(root, docs, until: list[str]) -> None:
    data = root / "docs.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in docs) + "\n")
    (root / "tasks").mkdir()
    (root / "tasks" / "herd_chat.yaml").write_text(f"""task: herd_chat
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: {json.dumps(until)}
  max_gen_toks: {MAX_GEN}
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""")


@torch.inference_mode()
def _greedy_reference(model, tok, question: str, until: list[str]) -> tuple[str, list[int]]:
    """(the text cut at the first stop string, every new token id)."""
    ids = ChatFormat(tok, version="3.1").encode_dialog_prompt([Message(role="user", content=question)]).tokens
    new: list[int] = []
    for _ in range(MAX_GEN):
        logits = model(torch.tensor([ids + new]))  # (1, S, V): the whole sequence again, no cache
        token = int(logits[0, -1].argmax())
        if token in tok.stop_tokens:
            break
        new.append(token)
    text = tok.decode([t for t in new if t not in tok.special_tokens.values()])
    for s in until:
        text = text.split(s)[0]
    return text, new


@pytest.mark.slow
def test_local_chat_completions_generate_until_matches_a_plain_greedy_loop(model, tok, server, tmp_path,
                                                                          monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    full, new = _greedy_reference(model, tok, DOCS[0]["question"], [])
    assert len(new) == MAX_GEN, "the random model stopped early; pick another seed"
    until = ["\n\n", tok.decode([new[3]])]  # its fourth token's text ends every answer early
    # One document's target is what the model really says, so exact_match is 1/3, not trivially 0.
    docs = [dict(d) for d in DOCS]
    docs[0]["answer"] = _greedy_reference(model, tok, docs[0]["question"], until)[0]
    assert docs[0]["answer"] and len(docs[0]["answer"]) < len(full)
    _task(tmp_path, docs, until)
    args = {"model": "tiny", "base_url": server.url + "/v1/chat/completions", "max_length": CONTEXT,
            "max_retries": 1, "tokenizer_backend": "none", "max_gen_toks": MAX_GEN}
    out = simple_evaluate(model="local-chat-completions", model_args=args, tasks=["herd_chat"], num_fewshot=0,
                          apply_chat_template=True, task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                          log_samples=True)
    samples = sorted(out["samples"]["herd_chat"], key=lambda s: s["doc_id"])
    got = [s["resps"][0][0] for s in samples]
    want = [_greedy_reference(model, tok, d["question"], until)[0] for d in docs]
    assert got == want
    expected_em = sum(w == d["answer"] for w, d in zip(want, docs)) / len(docs)
    assert expected_em >= 1 / 3
    assert out["results"]["herd_chat"]["exact_match,none"] == pytest.approx(expected_em)
