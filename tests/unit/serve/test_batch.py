"""Offline batch generation: JSONL in, JSONL out through the engine, checked against
`herd.generate.generate` one prompt at a time, and for resume, sharding and seeding."""

import json
import random
from pathlib import Path

import pytest
import torch

from herd.generate import GREEDY, generate
from herd.generate.loading import LoadedModel
from herd.model import ModelArgs, build_model
from herd.serve import Engine
from herd.serve.batch import generate_all, merge_results, part_path, run_batch
from herd.serve.batch_io import BatchDefaults, ResultsFile, item_seed, read_batch_input, read_results
from herd.tokenizer import ChatFormat, Message, Tokenizer

CONTEXT = 128
PROMPTS = ["Llamas live in", "The capital of", "a", "Once upon a time there", "Why is the sky", "1 2 3",
           "herd of llamas", "xyz"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer({bytes([i]): i for i in range(256)}, name="bytes")  # vocabulary 512 with the specials


@pytest.fixture(scope="module")
def lm(tok):
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, max_seq_len=CONTEXT)
    m = build_model(args, seed=5)
    with torch.no_grad():  # a sharper head: batched and single-row decoding (rounding differently) agree
        m.output.weight.mul_(4.0)
        m.output.weight[tok.eot_id] += m.output.weight.std()  # greedy answers end after 2 to 17 tokens
    return LoadedModel(m.eval(), tok, Path("."), _chat=ChatFormat(tok, version="3.1"))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _engine(lm, max_batch=3, max_queue=2):
    return Engine(lm.model, max_batch=max_batch, max_queue=max_queue, max_seq_len=CONTEXT,
                  token_bytes=lm.tokenizer.decode_single_token_bytes)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _by_id(path):
    records = read_results(path)[0]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {r["id"]: r for r in records}


def test_greedy_batch_equals_generate_per_prompt(lm, tok, tmp_path):
    budgets = [5, 17, 9, 30, 1, 12, 20, 3]
    rows = [{"id": i, "prompt": p, "max_tokens": n} for i, (p, n) in enumerate(zip(PROMPTS, budgets))]
    rows.append({"id": "chat", "messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "hello"}], "max_tokens": 10})
    src = _write(tmp_path / "in.jsonl", rows)
    stats = run_batch(_engine(lm), lm, src, tmp_path / "out.jsonl", defaults=BatchDefaults(temperature=0))
    assert stats.finished == stats.requests == 9 and not stats.skipped and stats.failed == 0
    got = _by_id(tmp_path / "out.jsonl")
    chat = ChatFormat(tok, version="3.1").encode_dialog_prompt([Message("system", "Be brief."),
                                                                 Message("user", "hello")]).tokens
    prompts = [tok.encode(p, bos=True, eos=False) for p in PROMPTS] + [chat]
    for row, prompt in zip(rows, prompts):
        [want] = generate(lm.model, [prompt], max_new_tokens=row["max_tokens"], sampling=GREEDY,
                          stop_tokens=tok.stop_tokens)
        rec = got[row["id"]]
        assert rec["choices"] == [{"index": 0, "text": tok.decode(want.tokens), "finish_reason": want.finish_reason,
                                   "completion_tokens": len(want.tokens)}]
        assert rec["prompt_tokens"] == len(prompt)
    assert {r["choices"][0]["finish_reason"] for r in got.values()} == {"stop", "length"}  # both paths ran
    assert stats.completion_tokens == sum(r["completion_tokens"] for r in got.values())


def test_stop_strings_cut_the_text_and_n_gives_independent_choices(lm, tok, tmp_path):
    [free] = generate(lm.model, [tok.encode("abc", bos=True, eos=False)], max_new_tokens=12, sampling=GREEDY)
    text = tok.decode(free.tokens)
    stop = text[4:6]
    src = _write(tmp_path / "in.jsonl", [{"id": "s", "prompt": "abc", "max_tokens": 12, "stop": stop,
                                          "temperature": 0, "metadata": {"k": 1}},
                                         {"id": "n", "prompt": "abc", "n": 3, "temperature": 1.0, "top_p": 1.0,
                                          "max_tokens": 8, "seed": 7}])
    run_batch(_engine(lm), lm, src, tmp_path / "out.jsonl", defaults=BatchDefaults())
    got = _by_id(tmp_path / "out.jsonl")
    assert got["s"]["choices"][0]["text"] == text[: text.find(stop)]
    assert got["s"]["choices"][0]["finish_reason"] == "stop" and got["s"]["metadata"] == {"k": 1}
    texts = [c["text"] for c in got["n"]["choices"]]
    assert [c["index"] for c in got["n"]["choices"]] == [0, 1, 2] and len(set(texts)) > 1
    assert got["n"]["seed"] == 7


def test_bad_lines_are_skipped_and_counted_or_stop_the_run_with_strict(lm, tmp_path):
    rows = [{"id": "ok", "prompt": "fine", "max_tokens": 2},
            "{not json",
            {"prompt": "no id"},
            {"id": "ok", "prompt": "duplicate"},
            {"id": 3, "prompt": "x", "max_tokens": "5"},
            {"id": 4, "prompt": "x", "messages": [{"role": "user", "content": "both"}]},
            {"id": 5, "prompt": "x", "max_token": 5},
            {"id": 6, "prompt": "x" * (CONTEXT + 5)},
            {"id": [7], "prompt": "x"},
            {"id": 8, "messages": [{"role": "user", "content": "y"}], "max_tokens": 2}]
    src = _write(tmp_path / "in.jsonl", rows)
    stats = run_batch(_engine(lm), lm, src, tmp_path / "out.jsonl", defaults=BatchDefaults(temperature=0))
    assert stats.finished == 2 and set(_by_id(tmp_path / "out.jsonl")) == {"ok", 8}
    assert [s.split(": ", 1)[0] for s in stats.skipped] == [f"{src}:{k}" for k in range(2, 10)]
    for fragment in ("not a JSON line", 'missing "id"', "duplicate id", '"max_tokens" must be an integer',
                     "exactly one of", "unknown key", "context is 128", '"id" must be a string'):
        assert any(fragment in s for s in stats.skipped), fragment
    with pytest.raises(ValueError, match=rf"{src}:2: not a JSON line"):
        run_batch(_engine(lm), lm, src, tmp_path / "strict.jsonl", defaults=BatchDefaults(), strict=True)


def test_a_torn_last_line_is_cut_and_damage_before_it_is_an_error(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": 1, "choices": []}\n{"id": 2, "choi')
    assert [r["id"] for r in read_results(path)[0]] == [1]
    with ResultsFile(path) as f:
        assert f.done == {1}
        f.append({"id": 3, "choices": []})
    assert path.read_text() == '{"id": 1, "choices": []}\n{"id": 3, "choices": []}\n'
    path.write_text('{"id": 1}\ngarbage\n{"id": 2}\n')
    with pytest.raises(ValueError, match="out.jsonl:2: not a result line"):
        read_results(path)


def _sampled_input(tmp_path, name="in.jsonl", order=None):
    rows = [{"id": f"p{i}", "prompt": p, "max_tokens": 6 + 3 * i, "n": 1 + i % 2} for i, p in enumerate(PROMPTS)]
    if order is not None:
        rows = [rows[k] for k in order]
    return _write(tmp_path / name, rows)


SAMPLED = BatchDefaults(temperature=1.0, top_p=0.95, seed=1234)


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(lm, tmp_path, monkeypatch):
    src = _sampled_input(tmp_path)
    run_batch(_engine(lm), lm, src, tmp_path / "whole.jsonl", defaults=SAMPLED)
    want = _by_id(tmp_path / "whole.jsonl")

    real_append, calls = ResultsFile.append, []

    def crashing_append(self, record):
        calls.append(record["id"])
        if len(calls) == 4:  # dies inside the 4th write: half a line reaches the file
            self._f.write(json.dumps(record).encode()[:20])
            self._f.flush()
            raise KeyboardInterrupt
        real_append(self, record)

    monkeypatch.setattr(ResultsFile, "append", crashing_append)
    with pytest.raises(KeyboardInterrupt):
        run_batch(_engine(lm), lm, src, tmp_path / "resumed.jsonl", defaults=SAMPLED)
    monkeypatch.setattr(ResultsFile, "append", real_append)
    assert len(read_results(tmp_path / "resumed.jsonl")[0]) == 3
    stats = run_batch(_engine(lm, max_batch=4), lm, src, tmp_path / "resumed.jsonl", defaults=SAMPLED)
    assert stats.already_done == 3 and stats.finished == len(PROMPTS) - 3
    assert _by_id(tmp_path / "resumed.jsonl") == want


def test_seeded_samples_do_not_depend_on_order_batching_or_shard(lm, tmp_path):
    run_batch(_engine(lm), lm, _sampled_input(tmp_path), tmp_path / "a.jsonl", defaults=SAMPLED)
    want = _by_id(tmp_path / "a.jsonl")
    order = list(range(len(PROMPTS)))
    random.Random(0).shuffle(order)
    shuffled = _sampled_input(tmp_path, "shuffled.jsonl", order)
    out = tmp_path / "b.jsonl"
    for i in range(2):  # two shards of the shuffled file through engines of other sizes, then merged
        run_batch(_engine(lm, max_batch=2 + i, max_queue=1), lm, shuffled, part_path(out, i, 2),
                  defaults=SAMPLED, shard=(i, 2))
    assert merge_results(shuffled, out) == len(PROMPTS)
    assert not list(tmp_path.glob("b.jsonl.part*"))
    assert [r["id"] for r in read_results(out)[0]] == [f"p{k}" for k in order]  # merged in input order
    assert _by_id(out) == want
    texts = {c["text"] for r in want.values() for c in r["choices"]}
    assert len(texts) > len(PROMPTS) // 2  # sampling did happen


def test_item_seeds_depend_on_the_run_seed_and_the_id_only():
    assert item_seed(0, "a") == item_seed(0, "a")
    assert len({item_seed(0, "a"), item_seed(1, "a"), item_seed(0, "b"), item_seed(0, 1), item_seed(0, "1")}) == 5
    assert all(0 <= item_seed(s, "x") < 2**62 for s in range(50))


def test_closing_early_cancels_and_leaves_the_engine_reusable(lm, tok, tmp_path):
    engine = _engine(lm, max_batch=2)
    src = _write(tmp_path / "in.jsonl", [{"id": i, "prompt": p, "max_tokens": 20} for i, p in enumerate(PROMPTS)])
    batch = read_batch_input(src, defaults=BatchDefaults(temperature=0), encode_text=lm.encode_text,
                             encode_messages=lambda m: [], context=CONTEXT, max_n=2)
    results = generate_all(engine, batch.items, stop_tokens=tok.stop_tokens)
    next(results)
    results.close()
    m = engine.metrics()
    assert m.slots_busy == 0 and m.requests_waiting == 0
    again = list(generate_all(engine, batch.items[:2], stop_tokens=tok.stop_tokens))
    assert len(again) == 2



def test_parts_of_an_interrupted_sharded_run_resume_under_another_shard_count(lm, tmp_path):
    src = _sampled_input(tmp_path)
    run_batch(_engine(lm), lm, src, tmp_path / "whole.jsonl", defaults=SAMPLED)
    out = tmp_path / "out.jsonl"
    first = part_path(out, 1, 3)  # a 3-worker run of which only worker 1 finished
    run_batch(_engine(lm), lm, src, first, defaults=SAMPLED, shard=(1, 3))
    done = {r["id"] for r in read_results(first)[0]}
    assert 0 < len(done) < len(PROMPTS)
    stats = run_batch(_engine(lm), lm, src, out, defaults=SAMPLED, done=done)  # resumed in one process
    assert stats.already_done == len(done) and stats.finished == len(PROMPTS) - len(done)
    merge_results(src, out)
    assert _by_id(out) == _by_id(tmp_path / "whole.jsonl") and not first.exists()
