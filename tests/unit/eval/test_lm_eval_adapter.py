"""The lm-eval adapter answers lm-eval's requests exactly as herd's own scoring does.

Requests are faked with the one attribute models read (`.args`), so these run without lm-eval;
the last test checks the real subclass and `Instance` objects when lm-eval is installed.
"""

from types import SimpleNamespace

import pytest
import torch

from herd.eval.lm_eval_adapter import HerdRequests
from herd.eval.multiple_choice import MCExample, build_prompt, evaluate_mc
from herd.eval.scoring import score_continuations
from herd.generate import GREEDY, generate
from herd.model import ModelArgs, build_model


@pytest.fixture(scope="module")
def model(byte_tok):
    return build_model(ModelArgs.from_name("debug").replace(vocab_size=byte_tok.n_words), seed=2).eval()


def req(*args):
    return SimpleNamespace(args=args)


def test_loglikelihood_equals_direct_multiple_choice_scoring(model, byte_tok):
    examples = [MCExample("Which is a llama?", ("a camelid", "a fish", "a bird"), 0),
                MCExample("Two plus two?", ("four", "five"), 0)]
    direct = evaluate_mc(model, byte_tok, examples, num_shots=1, seed=1)
    adapter = HerdRequests(model, byte_tok, batch_size=2)
    for ex, pred in zip(examples, direct.predictions):
        prompt = build_prompt(ex, [e for e in examples if e is not ex])
        got = adapter.loglikelihood([req(prompt, f" {c}") for c in ex.choices])
        assert [lp for lp, _ in got] == pytest.approx(pred.logprobs, abs=1e-5)


def test_trailing_context_space_moves_to_the_continuation(model, byte_tok):
    adapter = HerdRequests(model, byte_tok)
    [(a, ga), (b, gb)] = adapter.loglikelihood([req("Answer: ", "yes"), req("Answer:", " yes")])
    assert a == pytest.approx(b, abs=1e-6) and ga == gb
    ctx, cont = adapter.encode_pair("Answer: ", "yes")
    assert ctx == [byte_tok.bos_id, *b"Answer:"] and cont == list(b" yes")
    # An empty context is BOS alone.
    [(lp, _)] = adapter.loglikelihood([req("", "hi")])
    [direct] = score_continuations(model, [([byte_tok.bos_id], list(b"hi"))])
    assert lp == pytest.approx(direct.logprob, abs=1e-6)


def test_rolling_loglikelihood_is_the_bos_conditioned_sum(model, byte_tok):
    text = "Llamas hum when they are content."
    adapter = HerdRequests(model, byte_tok)
    [total] = adapter.loglikelihood_rolling([req(text)])
    ids = [byte_tok.bos_id, *text.encode()]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])), -1)[0]
    assert total == pytest.approx(sum(float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1)), abs=1e-4)
    # With a short window every token is still scored once, so the total changes but stays finite.
    [windowed] = HerdRequests(model, byte_tok, max_length=8).loglikelihood_rolling([req(text)])
    assert windowed != pytest.approx(total, abs=1e-4) and windowed < 0


def test_generate_until_is_greedy_and_cut_at_the_stop_string(model, byte_tok):
    adapter = HerdRequests(model, byte_tok)
    [full] = generate(model, [byte_tok.encode("Q: hi", bos=True, eos=False)], max_new_tokens=12, sampling=GREEDY,
                      stop_tokens=(byte_tok.eos_id,))
    text = byte_tok.decode(full.tokens)
    [out] = adapter.generate_until([req("Q: hi", {"max_gen_toks": 12})])
    assert out == text
    stop = text[3:5] if len(text) >= 5 else text[-1:]
    [cut] = adapter.generate_until([req("Q: hi", {"until": [stop], "max_gen_toks": 12})])
    assert cut == text[: text.index(stop)]
    with pytest.raises(ValueError, match="greedy"):
        adapter.generate_until([req("Q", {"do_sample": True, "temperature": 0.7})])
    with pytest.raises(ValueError, match="unsupported"):
        adapter.generate_until([req("Q", {"top_k": 5})])


def test_real_lm_eval_subclass(model, byte_tok):
    pytest.importorskip("lm_eval.api.model")
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM

    from herd.eval.lm_eval_adapter import herd_lm

    lm = herd_lm(model, byte_tok, batch_size=4)
    assert isinstance(lm, LM) and lm.rank == 0 and lm.world_size == 1
    inst = Instance(request_type="loglikelihood", doc={}, arguments=("The sky is", " blue"), idx=0)
    [(lp, greedy)] = lm.loglikelihood([inst])
    [direct] = score_continuations(model, [([byte_tok.bos_id, *b"The sky is"], list(b" blue"))])
    assert (lp, greedy) == (pytest.approx(direct.logprob, abs=1e-6), direct.is_greedy)


def test_harness_on_a_local_task_agrees_with_herd_accuracy(model, byte_tok, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval.evaluator")  # the full harness (datasets, evaluate, ...), not just its API
    import json

    from herd.eval.lm_eval_adapter import run_lm_eval
    from herd.eval.multiple_choice import load_mc_jsonl

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "llamas.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in [
        {"question": "What do llamas eat?", "choices": ["grass", "fish", "rocks"], "answer": 0},
        {"question": "Where are llamas from?", "choices": ["the Andes", "the Alps"], "answer": 0},
        {"question": "Sky colour?", "choices": ["green", "blue"], "answer": 1},
        {"question": "Legs of a llama?", "choices": ["two", "four", "six"], "answer": 1},
    ]) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "herd_llamas.yaml").write_text(f"""task: herd_llamas
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
    [res] = run_lm_eval(model, byte_tok, ["herd_llamas"], include_path=str(tmp_path / "tasks"), num_fewshot=0)
    direct = evaluate_mc(model, byte_tok, load_mc_jsonl(data))
    assert res.task == "herd_llamas" and res.num_examples == 4
    assert res.metrics["acc,none"] == direct.accuracy
    assert res.metrics["acc_norm,none"] == direct.accuracy_norm  # both per character / byte of the choice
