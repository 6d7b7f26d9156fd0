"""The executor end to end: every dropped document counted with its reason, resume after a crash,
config errors, token shards the loader can open, classifiers and the mix."""

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from herd.data.document import Document
from herd.data.pipeline import PipelineConfig, run_pipeline
from herd.data.steps.base import Filter
from herd.data.steps.classifiers import Classify, train_fasttext, train_transformer
from herd.data.steps.dedup import ExactDedup, LineDedup, MinHashDedup
from herd.data.steps.filters import GopherQuality, GopherRepetition, PiiMask
from herd.data.steps.mix import Mix, mix_rates

TOPICS = {
    "cooking": "the chef adds garlic onion butter salt pepper to the pan and stirs the sauce slowly over heat".split(),
    "code": "the function returns a list of integers after the loop parses each argument and raises an error".split(),
}


def corpus(rng, random_words, n=60):
    docs = []
    for i in range(n):
        topic = "cooking" if i % 2 else "code"
        words = [rng.choice(TOPICS[topic]) for _ in range(120)]
        text = " ".join(words[:60]) + ".\n" + " ".join(words[60:]) + ".\nContact me at someone@mail.example.org."
        docs.append(Document(id=f"d{i}", text=text, metadata={"domain": topic}))
    docs += [Document(id="exact", text=docs[0].text), Document(id="short", text="too short to keep.")]
    docs.append(Document(id="spam", text="buy now " * 80))
    return docs


def steps():
    return [ExactDedup(), MinHashDedup(), LineDedup(max_occurrences=6), GopherRepetition(), GopherQuality(), PiiMask()]


def test_every_dropped_document_is_counted_with_a_reason(tmp_path, rng, random_words, run_steps):
    docs = corpus(rng, random_words)
    out, stats = run_steps(tmp_path, docs, steps(), shards=3, workers=2)
    for s in stats.values():
        if s.type != "read":
            assert s.docs_in + s.docs_added == s.docs_out + s.num_dropped, s.name
            assert all(reason for reason in s.dropped)
    assert stats["read"].docs_out == len(docs)
    assert len(docs) - len(out) == sum(s.num_dropped for s in stats.values())
    assert stats["exact_dedup"].dropped == {"exact_duplicate": 1}
    assert stats["gopher_repetition"].dropped.get("gopher_dup_para_frac", 0) + sum(
        stats["gopher_repetition"].dropped.values()) >= 1  # "buy now" spam
    assert "short" not in {d.id for d in out} and "spam" not in {d.id for d in out}
    # the contact line is in every document: line dedup removes it before PII masking sees it
    assert stats["line_dedup"].counters["lines_removed"] >= 60 and not any("Contact" in d.text for d in out)


@dataclass
class _CrashOnce(Filter):
    type: ClassVar[str] = "crash_once"
    name: str = "crash_once"
    marker: str = ""

    def filter(self, doc):
        import os

        if doc.id == "d7" and os.path.exists(self.marker):
            raise RuntimeError("simulated crash")
        return True, None


def test_crash_then_resume_gives_identical_output(tmp_path, rng, random_words, run_steps):
    docs = corpus(rng, random_words)
    clean, _ = run_steps(tmp_path / "clean", docs, steps() + [_CrashOnce(marker="/nonexistent")], shards=3)
    marker = tmp_path / "crash"
    marker.write_text("1")
    crashing = steps() + [_CrashOnce(marker=str(marker))]
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_steps(tmp_path / "resumed", docs, crashing, shards=3)
    work = tmp_path / "resumed" / "run" / "work"
    finished_before = sorted(p.name for p in work.glob("stage_*/*.stats.json"))
    assert finished_before  # the stages before the crash finished and are kept
    marker.unlink()
    resumed, _ = run_steps(tmp_path / "resumed", docs, crashing, shards=3)
    assert [d.to_dict() for d in resumed] == [d.to_dict() for d in clean]


def test_config_errors_name_the_fix(tmp_path):
    base = {"pipeline": {"output_dir": str(tmp_path / "o")}, "input": [{"type": "jsonl", "paths": ["x"]}],
            "output": [{"type": "jsonl", "path": "o.jsonl"}]}
    with pytest.raises(ValueError, match="unknown key.*thresold.*valid keys"):
        PipelineConfig.from_dict({**base, "step": [{"type": "gopher_quality", "thresold": 1}]})
    with pytest.raises(ValueError, match="unknown or missing type 'nope'"):
        PipelineConfig.from_dict({**base, "step": [{"type": "nope"}]})
    with pytest.raises(ValueError, match="names must be unique"):
        PipelineConfig.from_dict({**base, "step": [{"type": "pii"}, {"type": "pii"}]})
    with pytest.raises(ValueError, match="output_dir"):
        PipelineConfig.from_dict({**base, "pipeline": {}})


def test_toml_pipeline_writes_loadable_token_shards(tmp_path, rng, random_words):
    shards = pytest.importorskip("herd.data.shards")
    from herd.data.steps.writers import write_jsonl

    docs = corpus(rng, random_words, n=20)
    write_jsonl(docs, tmp_path / "in.jsonl.gz")
    toml = tmp_path / "p.toml"
    toml.write_text(f"""
[pipeline]
output_dir = "{tmp_path / 'run'}"
workers = 1
[[input]]
type = "jsonl"
paths = ["{tmp_path / 'in.jsonl.gz'}"]
[[step]]
type = "exact_dedup"
[[step]]
type = "gopher_quality"
[[output]]
type = "shards"
path = "shards"
[[output]]
type = "parquet"
path = "docs.parquet"
""")
    report = run_pipeline(PipelineConfig.from_toml(toml), log=lambda m: None)
    kept = report.outputs["shards"]["docs"]
    ts = shards.open_shards(tmp_path / "run" / "shards")
    assert ts.num_docs == kept == 20 and ts.num_tokens == report.outputs["shards"]["tokens"]
    assert ts.doc(0)[0] == 128000 and ts.doc(0)[-1] == 128001  # BOS ... EOS
    assert json.loads((tmp_path / "run" / "report.json").read_text())["outputs"]["parquet"]["docs"] == 20
    assert (tmp_path / "run" / "report.html").read_text().startswith("<!doctype html>")
    # the same file again resumes (nothing to redo); an edited file is refused
    run_pipeline(PipelineConfig.from_toml(toml), log=lambda m: None)
    toml.write_text(toml.read_text().replace('type = "gopher_quality"', 'type = "fineweb"'))
    with pytest.raises(ValueError, match="different pipeline"):
        run_pipeline(PipelineConfig.from_toml(toml), log=lambda m: None)


# ---- classifiers and mix -------------------------------------------------------------------------


def labelled(rng, n):
    return [(" ".join(rng.choice(TOPICS[t]) for _ in range(40)), t) for t in ("cooking", "code") for _ in range(n)]


def test_fasttext_classifier_trains_and_scores(tmp_path, rng, random_words, run_steps):
    info = train_fasttext(labelled(rng, 100), tmp_path / "m.bin", epoch=5)
    assert info["accuracy"] >= 0.95 and info["labels"] == ["code", "cooking"]
    docs = corpus(rng, random_words, n=20)[:20]
    domain = Classify(model=str(tmp_path / "m.bin"), field="topic", name="domain")
    quality = Classify(model=str(tmp_path / "m.bin"), field="cooking_score", positive_label="cooking",
                       threshold=0.5, name="quality")
    out, stats = run_steps(tmp_path, docs, [domain, quality])
    assert all(d.metadata["topic"] == d.metadata["domain"] for d in out)
    assert {d.metadata["domain"] for d in out} == {"cooking"}
    assert stats["quality"].dropped == {"cooking_score_below_threshold": 10}


def test_tiny_transformer_classifier_trains_and_loads(tmp_path, rng):
    info = train_transformer(labelled(rng, 40), tmp_path / "m.pt", epochs=4, max_len=32)
    assert info["accuracy"] >= 0.9 and info["parameters"] < 1_000_000
    step = Classify(model=str(tmp_path / "m.pt"), field="topic")
    from herd.data.steps.base import StepStats

    docs = [Document(id=str(i), text=t) for i, (t, _) in enumerate(labelled(rng, 5))]
    out = list(step(docs, StepStats(name="c", type="classify")))
    assert [d.metadata["topic"] for d in out] == ["cooking"] * 5 + ["code"] * 5


def test_mix_rates_by_hand():
    assert mix_rates({"general": 100, "code": 10}, {"general": 0.5, "code": 0.5}) == {"general": 0.1, "code": 1.0}
    assert mix_rates({"general": 100, "code": 10}, {"general": 0.5, "code": 0.5}, max_repeat=2) == pytest.approx(
        {"general": 0.2, "code": 2.0})
    # a weighted domain without data is left out and the rest renormalised
    assert mix_rates({"general": 100}, {"general": 0.5, "math": 0.25}) == {"general": 1.0, "math": 0.0}
    with pytest.raises(ValueError, match="none of the weighted domains"):
        mix_rates({"other": 5}, {"general": 1.0})


def test_mix_step_hits_the_target_shares(tmp_path, run_steps):
    docs = [Document(id=f"g{i}", text="x" * 100, metadata={"domain": "general"}) for i in range(400)]
    docs += [Document(id=f"c{i}", text="y" * 100, metadata={"domain": "code"}) for i in range(50)]
    docs += [Document(id="u", text="z", metadata={"domain": "unknown"})]
    out, stats = run_steps(tmp_path, docs, [Mix(weights={"general": 0.75, "code": 0.25}, max_repeat=2)], shards=2)
    n_code = sum(d.metadata["domain"] == "code" for d in out)
    assert n_code == 100 and stats["mix"].docs_added == 50  # every code doc twice
    n_general = len(out) - n_code
    assert 250 < n_general < 350  # rate 0.75 of 400 = 300 expected
    assert stats["mix"].dropped["mix_domain_not_weighted"] == 1


def test_token_kl_per_language_reference_from_the_corpus(tmp_path, rng, run_steps):
    from herd.data.steps.filters import TokenKL

    en = "the cat sat on the mat and the dog sat on the rug".split()
    fr = "le chat est sur le tapis et le chien est sur la natte".split()
    docs = [Document(id=f"en{i}", text=" ".join(rng.choice(en) for _ in range(60)), metadata={"language": "en"})
            for i in range(20)]
    docs += [Document(id=f"fr{i}", text=" ".join(rng.choice(fr) for _ in range(60)), metadata={"language": "fr"})
             for i in range(3)]
    docs.append(Document(id="odd", text=" ".join(f"tok{i}" for i in range(60)), metadata={"language": "en"}))
    # Per language, French is scored against French and passes; the page of unique tokens does not.
    out, stats = run_steps(tmp_path / "a", docs, [TokenKL(by="language", min_tokens=50, max_kl=2.0)])
    assert {d.id for d in out} == {d.id for d in docs} - {"odd"}
    # One reference for all: the French minority now looks like outliers too.
    out, stats = run_steps(tmp_path / "b", docs, [TokenKL(min_tokens=50, max_kl=2.0)])
    assert {d.id for d in docs} - {d.id for d in out} == {"odd", "fr0", "fr1", "fr2"}


def test_cap_rates_by_hand():
    from herd.data.steps.mix import cap_rates

    # web may be at most 10% of the output: kept/(900 + kept) = 0.1 -> kept 100 of 300.
    assert cap_rates({"wiki": 600, "code": 300, "web": 300}, {"web": 0.1}) == pytest.approx(
        {"wiki": 1.0, "code": 1.0, "web": 1 / 3})
    # a domain already under its cap is kept whole, and the other cap is computed without it:
    # a = 0.2 * (1000 + 10 + a) -> a = 252.5 of 500.
    assert cap_rates({"x": 1000, "a": 500, "b": 10}, {"a": 0.2, "b": 0.2}) == pytest.approx(
        {"x": 1.0, "a": 252.5 / 500, "b": 1.0})
    with pytest.raises(ValueError, match="uncapped domain"):
        cap_rates({"web": 10}, {"web": 0.5})
    with pytest.raises(ValueError, match="summing below 1"):
        cap_rates({"x": 1, "web": 10}, {"web": 0.6, "x": 0.5})
    with pytest.raises(ValueError, match="either weights"):
        Mix(weights={"a": 1.0}, caps={"a": 0.1})


def test_mix_caps_keep_the_other_sources_whole(tmp_path, run_steps):
    docs = [Document(id=f"w{i}", text="x" * 100, metadata={"source": "wiki"}) for i in range(300)]
    docs += [Document(id=f"p{i}", text="y" * 100, metadata={"source": "web"}) for i in range(300)]
    out, stats = run_steps(tmp_path, docs, [Mix(field="source", caps={"web": 0.25})], shards=2)
    n_web = sum(d.metadata["source"] == "web" for d in out)
    assert len(out) - n_web == 300  # every wiki document, none repeated
    assert 70 < n_web < 130  # 100 expected: 100 / (300 + 100) = 0.25
    assert stats["mix"].dropped == {"mix_downsampled_web": 300 - n_web}


def test_signature_files_are_named_by_their_format_and_old_names_resume(tmp_path, rng, random_words, run_steps):
    import numpy as np

    docs = [Document(id=f"g{i}", text=random_words(rng, 20), metadata={"domain": "general"}) for i in range(40)]
    docs += docs[:5]  # exact duplicates for the dedup to find
    pipeline = [ExactDedup(), Mix(weights={"general": 1.0})]  # stage 0 ends in dedup, stage 1 in the mix
    run_steps(tmp_path, docs, pipeline, shards=2)
    work = tmp_path / "run" / "work"
    assert sorted(p.name for p in work.glob("stage_*/sig_*")) == [
        "sig_00000.json", "sig_00000.npz", "sig_00001.json", "sig_00001.npz"]
    for p in work.glob("stage_0/sig_*.npz"):  # a real numpy archive, as its name says
        with np.load(p) as z:
            assert len(z["key"]) > 0
    chars = sum(json.loads(p.read_text())["general"] for p in work.glob("stage_1/sig_*.json"))
    assert chars == sum(len(d.text) for d in docs[:40])  # the mix counts what the dedup kept
    # A run written before the rename kept the mix's JSON under .npz: resuming one that stopped
    # before planning must plan from those files instead of failing on a missing .json.
    plan = work / "plan_1" / "plan.json"
    assert json.loads(plan.read_text())["chars_in"] == {"general": chars}
    plan.unlink()
    for p in work.glob("stage_1/sig_*.json"):
        p.rename(p.with_suffix(".npz"))
    run_steps(tmp_path, docs, pipeline, shards=2)
    assert json.loads(plan.read_text())["chars_in"] == {"general": chars}
