"""Pipeline files through the shared typed loader: errors that name the full key path, overrides of
nested keys, `--print-config` that reads back equal, and `--help` listing every key."""

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest

from herd.cli import main
from herd.config import build, to_toml
from herd.data.pipeline import run_pipeline
from herd.data.pipeline_config import PipelineConfig, PipelineFile, load_pipeline
from herd.data.steps import OUTPUTS, READERS, STEPS
from herd.data.steps.filters import GopherQuality

ROOT = Path(__file__).resolve().parents[4]
SHIPPED = sorted((ROOT / "configs" / "data").glob("*.toml"))


def _base(tmp_path, **pipeline):
    return {"pipeline": {"output_dir": str(tmp_path / "o"), **pipeline},
            "input": [{"type": "jsonl", "paths": [str(tmp_path / "in" / "*.jsonl")]}],
            "step": [{"type": "exact_dedup"}, {"type": "gopher_quality", "min_words": 3}],
            "output": [{"type": "jsonl", "path": "out.jsonl"}]}


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


FILE = """
[pipeline]
output_dir = "{out}"

[[input]]
type = "jsonl"
paths = ["{inp}"]

[[step]]
type = "exact_dedup"

[[step]]
type = "gopher_quality"
min_words = 3

[[output]]
type = "jsonl"
path = "out.jsonl"
"""


@pytest.mark.parametrize("change, message", [
    (lambda d: d["step"][1].update(thresold=1),
     'unknown key step[1].thresold in [[step]] of type "gopher_quality"; valid keys: name, where, min_words'),
    (lambda d: d["pipeline"].update(wrokers=2), "unknown key pipeline.wrokers in [pipeline]; valid keys: output_dir"),
    (lambda d: d.update(steps=[]), "unknown key steps in the top level; valid keys: pipeline, input, step, output"),
    (lambda d: d["output"][0].update(min={"quality": "high"}), "output[0].min.quality: expected a number, got 'high'"),
    (lambda d: d["step"][1].update(min_words="many"), "step[1].min_words: expected an integer, got 'many'"),
    (lambda d: d["step"][1].update(stop_words="the"), "step[1].stop_words: expected a list, got 'the'"),
    (lambda d: d["pipeline"].update(workers="2"), "pipeline.workers: expected an integer, got '2'"),
    (lambda d: d["step"].append({"type": "langid", "where": ["web"]}), "step[2].where: expected a table"),
    (lambda d: d["input"].append({"type": "folder", "root": "x", "glob": 3}),
     "input[1].glob: expected str or list of str, got 3"),
    (lambda d: d["step"][0].update(where={"source": "web"}), "step[0].where: `where` applies to filters"),
    (lambda d: d["step"][0].update(type="exact_dedupe"), "step[0]: unknown or missing type 'exact_dedupe'"),
    (lambda d: d["pipeline"].pop("output_dir"),
     "missing required key pipeline.output_dir in [pipeline]: where the run writes everything"),
    (lambda d: d.pop("pipeline"), "missing required key pipeline.output_dir"),
    (lambda d: d.update(train=[{"examples": []}]), "missing required key train.0.model in [train.0]"),
    (lambda d: d.update(train=[{"model": "m.bin", "examples": [], "kind": "svm"}]),
     "train.0.kind: 'svm' is not one of 'fasttext', 'transformer'"),
    (lambda d: d.update(train=[{"model": "m.bin", "examples": [
        {"label": "a", "input": {"type": "python_stdlib", "limt": 3}}]}]),
     'unknown key train.0.examples[0].input.limt in [[train]] input of type "python_stdlib"'),
    (lambda d: d.update(train=[{"model": "m.bin", "examples": [{"label": "a", "input": {"type": "austen"},
                                                                "limit": "all"}]}]),
     "train.0.examples[0].limit: expected a positive integer, got 'all'"),
])
def test_errors_name_the_full_key_path(tmp_path, change, message):
    d = _base(tmp_path)
    change(d)
    with pytest.raises(ValueError) as e:
        PipelineConfig.from_dict(d)
    assert message in str(e.value)


def test_a_valid_file_reads_as_before(tmp_path):
    d = _base(tmp_path)
    cfg = PipelineConfig.from_dict(d)
    assert [s.name for s in cfg.steps] == ["exact_dedup", "gopher_quality"]  # a name defaults to the type
    assert cfg.steps[1] == GopherQuality(name="gopher_quality", min_words=3)
    assert cfg.outputs[0].name == "jsonl" and cfg.workers == 1 and cfg.shards is None
    assert cfg.output_dir == tmp_path / "o" and cfg.raw == d


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_print_config_of_the_shipped_files_reads_back_equal(path, tmp_path, capsys):
    assert main(["data", "run", str(path), "--print-config"]) == 0
    printed = capsys.readouterr().out
    again = _write(tmp_path, printed)
    want = load_pipeline(path)
    got = load_pipeline(again)
    assert got.file == want.file and got.steps == want.steps and got.inputs == want.inputs
    assert got.train == want.train and got.output_dir == want.output_dir
    # every key of every entry is spelled out: the defaults the file leaves out are visible
    table = tomllib.loads(printed)
    for section, registry in (("input", READERS), ("step", STEPS), ("output", OUTPUTS)):
        for entry, obj in zip(table.get(section, []), getattr(want.file, section)):
            fields = {f.name for f in dataclasses.fields(registry[entry["type"]])}
            assert {k for k, v in dataclasses.asdict(obj).items() if v is not None and k in fields} == set(entry) - {
                "type"}


def test_overrides_of_nested_keys_reach_the_run_and_its_identity(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    docs = [{"id": f"d{i}", "text": " ".join(["the", "and"] + ["llama"] * i)} for i in range(6)]
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    path = _write(tmp_path, FILE.format(out=tmp_path / "run", inp=tmp_path / "in" / "*.jsonl"))
    overrides = ["--step.gopher_quality.min_words", "5", "--pipeline.workers=2", "--output.0.path", "kept.jsonl",
                 "--step.1.max_mean_word_len", "12"]
    cfg = load_pipeline(path, overrides)
    q = cfg.steps[1]
    assert (q.min_words, q.max_mean_word_len, cfg.workers, cfg.outputs[0].path) == (5, 12.0, 2, "kept.jsonl")
    assert cfg.raw["step"][1]["min_words"] == 5
    assert "max_mean_word_len" not in tomllib.loads(path.read_text())["step"][1]  # the file is left as it was

    # --print-config with the overrides reads back to the overridden config
    assert main(["data", "run", str(path), *overrides, "--print-config"]) == 0
    assert load_pipeline(_write(tmp_path / "in", capsys.readouterr().out)).file == cfg.file

    # the overrides reach the run: 2 + i words >= 5 keeps d3..d5 (the text passes GopherQuality's other rules)
    assert main(["data", "run", str(path), "--json", *overrides]) == 0
    report = json.loads(capsys.readouterr().out)
    kept = [json.loads(line)["id"] for line in (tmp_path / "run" / "kept.jsonl").read_text().splitlines()]
    assert report["outputs"]["jsonl"]["docs"] == len(kept)
    assert kept == [d["id"] for d in docs if len(d["text"].split()) >= 5] == ["d3", "d4", "d5"]
    # ... and are part of its identity: the same file with another value is another pipeline
    with pytest.raises(ValueError, match="different pipeline"):
        run_pipeline(load_pipeline(path, ["--step.gopher_quality.min_words", "4"]), log=lambda m: None)
    assert main(["data", "run", str(path), "--step.gopher_quality.min_words", "4"]) == 2
    assert "different pipeline" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    (["--step.gopher_quality.min_wrds", "5"], "--step.gopher_quality.min_wrds: unknown key 'min_wrds'; valid keys: "
     "name, where, min_words"),
    (["--step.gopher_quality.min_words", "five"], "--step.gopher_quality.min_words: expected an integer, got 'five'"),
    (["--step.exact_dedup.where", "{source = 'web'}"], "`where` applies to filters"),
    (["--step.fineweb.min_words", "5"], "no entry 'fineweb' in step; entries are 'exact_dedup', 'gopher_quality' "
     "(or an index 0..1)"),
    (["--step.gopher_quality", "5"], "whole entries cannot be added or replaced"),
    (["--step.0.type", "minhash"], "an entry's type cannot be overridden"),
    (["--pipelin.workers", "2"], "unknown section 'pipelin'; valid sections: pipeline, input, step, output, train"),
    (["--pipeline.workers", "0"], "[pipeline] workers must be >= 1, got 0"),
    (["--train.0.kind", "svm"], "the file has no train entries to override"),
    (["--pipeline.workers"], "override --pipeline.workers has no value"),
])
def test_override_errors_are_one_line_with_exit_status_2(tmp_path, capsys, override, message):
    path = _write(tmp_path, FILE.format(out=tmp_path / "run", inp=tmp_path / "*.jsonl"))
    with pytest.raises(ValueError) as e:
        load_pipeline(path, override)
    assert message in str(e.value)
    assert main(["data", "run", str(path), *override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("herd data run: error:") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing ran


def test_help_lists_every_section_and_each_types_keys(capsys):
    assert main(["data", "run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "output_dir = required  (str)" in out and "workers = 1  (int)" in out
    lines = out.splitlines()
    for section, registry in (("input", READERS), ("step", STEPS), ("output", OUTPUTS)):
        assert any(line.startswith(f"[[{section}]]") for line in lines), section
        for kind, cls in registry.items():
            keys = [f.name for f in dataclasses.fields(cls)
                    if f.name != "extractor" and not (f.name == "where" and not getattr(cls, "supports_where", True))]
            assert f'  type = "{kind}": {", ".join(keys)}' in lines, kind
    assert "--fresh" in out and "--print-config" in out


def test_the_typed_file_is_the_dataclass_tree_and_builds_from_its_own_toml(tmp_path):
    file = build(PipelineFile, _base(tmp_path, executor="ray", num_cpus=2)).validate()
    text = to_toml(file)
    assert tomllib.loads(text)["pipeline"] == {"output_dir": str(tmp_path / "o"), "workers": 1, "name": "",
                                               "executor": "ray", "num_cpus": 2}  # unset keys are left out
    assert "train" not in tomllib.loads(text)  # so is an empty list of tables
    assert build(PipelineFile, tomllib.loads(text)) == file
    assert build(PipelineFile, tomllib.loads(text.replace("num_cpus = 2", "num_cpus = 3"))) != file
