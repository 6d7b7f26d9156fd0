"""The Ray executor schedules the same (stage, shard) tasks as the local one: same bytes out, same
counts, same resume behaviour; its options are checked and a missing Ray says how to install it."""

import json
import sys

import pytest

from herd.data.document import Document
from herd.data.pipeline import PipelineConfig, run_pipeline
from herd.data.steps.writers import write_jsonl


def _pipeline(tmp_path, out: str, **executor) -> dict:
    return {"pipeline": {"output_dir": str(tmp_path / out), "workers": 2, "shards": 3, **executor},
            "input": [{"type": "jsonl", "paths": [str(tmp_path / "in" / "*.jsonl")]}],
            # every kind of stage: two global dedups (two plans), filters, a modifier after the last plan
            "step": [{"type": "exact_dedup"}, {"type": "minhash"}, {"type": "gopher_repetition"},
                     {"type": "gopher_quality"}, {"type": "line_dedup", "max_occurrences": 6}, {"type": "pii"}],
            "output": [{"type": "jsonl", "path": "out.jsonl"}]}


def _inputs(tmp_path, rng, random_words) -> None:
    docs = []
    for i in range(48):
        body = random_words(rng, 150)
        docs.append(Document(id=f"d{i}", text=f"{body}.\nWrite to someone@mail.example.org for the code."))
        if i % 8 == 0:  # a near duplicate (one word changed) and an exact one
            docs.append(Document(id=f"near{i}", text=docs[-1].text.replace(body.split()[40], "changed", 1)))
            docs.append(Document(id=f"exact{i}", text=docs[-2].text))
    docs.append(Document(id="spam", text="buy now " * 80))
    for s in range(3):
        write_jsonl(docs[s::3], tmp_path / "in" / f"part_{s}.jsonl")


def _counts(report) -> list[dict]:
    return [{k: v for k, v in s.to_dict().items() if k != "seconds"} for s in report.steps]


def _files(root) -> dict[str, bytes]:
    # Everything a run writes except wall-clock times (stats files, report) and the config copy.
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(("stats.json", ".html")) and p.name not in ("report.json",
                                                                                                 "pipeline.json")}


def test_ray_executor_gives_the_local_executors_bytes_and_resumes(tmp_path, rng, random_words):
    pytest.importorskip("ray")
    _inputs(tmp_path, rng, random_words)
    local = run_pipeline(PipelineConfig.from_dict(_pipeline(tmp_path, "local")), log=lambda m: None)
    ray_cfg = PipelineConfig.from_dict(_pipeline(tmp_path, "ray", executor="ray", num_cpus=2))
    remote = run_pipeline(ray_cfg, log=lambda m: None)

    assert _counts(remote) == _counts(local)
    assert remote.plans == local.plans and remote.plans["minhash"]["removed"] >= 6
    assert local.plans["exact_dedup"]["removed"] >= 6
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")
    for p in (tmp_path / "local" / "work").rglob("*.stats.json"):  # the counts inside, not the seconds
        strip = [{k: v for k, v in d.items() if k != "seconds"} for d in json.loads(p.read_text())]
        other = json.loads((tmp_path / "ray" / p.relative_to(tmp_path / "local")).read_text())
        assert strip == [{k: v for k, v in d.items() if k != "seconds"} for d in other]

    # Resume: one unfinished shard of the last stage is the only task run again, on Ray, after a
    # run started with the local executor (the executor is not part of the run's identity).
    last = sorted((tmp_path / "local" / "work").glob("stage_*"))[-1]
    (last / "shard_00001.stats.json").unlink()
    (tmp_path / "local" / "out.jsonl").unlink()
    lines: list[str] = []
    resumed = run_pipeline(PipelineConfig.from_dict(_pipeline(tmp_path, "local", executor="ray", num_cpus=2)),
                           log=lines.append)
    k = int(last.name.split("_")[1])
    runs = {int(m.split(":")[0].split()[1]): m.split(": ")[1].split(" (")[0] for m in lines if m.startswith("stage ")}
    assert runs == {i: "1 shard(s) run, 2 reused" if i == k else "0 shard(s) run, 3 reused" for i in range(k + 1)}
    assert _counts(resumed) == _counts(local)
    assert (tmp_path / "local" / "out.jsonl").read_bytes() == (tmp_path / "ray" / "out.jsonl").read_bytes()


def test_ray_options_are_checked_and_a_missing_ray_names_the_extra(tmp_path, monkeypatch):
    base = _pipeline(tmp_path, "o")
    with pytest.raises(ValueError, match="executor must be one of local, ray"):
        PipelineConfig.from_dict({**base, "pipeline": {**base["pipeline"], "executor": "dask"}})
    with pytest.raises(ValueError, match="Ray options"):
        PipelineConfig.from_dict({**base, "pipeline": {**base["pipeline"], "address": "auto"}})
    with pytest.raises(ValueError, match="remove one of the two"):
        PipelineConfig.from_dict({**base, "pipeline": {**base["pipeline"], "executor": "ray", "address": "auto",
                                                       "num_cpus": 2}})
    (tmp_path / "in").mkdir()
    write_jsonl([Document(id="a", text="one document.")], tmp_path / "in" / "a.jsonl")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    cfg = PipelineConfig.from_dict({**base, "pipeline": {**base["pipeline"], "executor": "ray"}})
    with pytest.raises(ImportError, match=r"pip install 'herd\[ray\]'"):
        run_pipeline(cfg, log=lambda m: None)
