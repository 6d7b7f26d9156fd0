import json
import random

import pytest

from herd.data.document import Document
from herd.data.pipeline import PipelineConfig, run_pipeline
from herd.data.steps.readers import JsonlReader, open_text
from herd.data.steps.writers import JsonlOutput, write_jsonl


def _run_steps(tmp_path, docs, steps, *, shards=1, workers=1):
    """Runs steps through the real executor: docs are split round-robin into `shards` JSONL files."""
    inp = tmp_path / "in"
    for s in range(shards):
        write_jsonl(docs[s::shards], inp / f"part_{s:03d}.jsonl")
    cfg = PipelineConfig(inputs=[JsonlReader(paths=[str(inp / "*.jsonl")])], steps=steps,
                         outputs=[JsonlOutput(path="out.jsonl", name="out")], output_dir=tmp_path / "run",
                         workers=workers, shards=shards, raw={})
    report = run_pipeline(cfg, log=lambda m: None)
    with open_text(tmp_path / "run" / "out.jsonl") as f:
        out = [Document.from_dict(json.loads(line)) for line in f]
    return out, {s.name: s for s in report.steps}


def _random_words(rng, n, vocab=5000):
    # Letters only: MinHash's normalisation maps every digit to 0, so "w12" and "w34" would be one word.
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(n))


@pytest.fixture
def run_steps():
    return _run_steps


@pytest.fixture
def random_words():
    return _random_words


@pytest.fixture
def rng():
    return random.Random(0)
