"""The chunked output head under FSDP, CP, TP and PP equals one process with the plain head (one gloo group).

See scenarios_chunked.py: losses and gradients over 3 AdamW steps within 1e-5 (fp32) and final
parameters, the trainer's TrainCore step with gradient accumulation, chunked evaluation, FSDP's
and TP's traffic against the analytic count (the head gathered and reduce-scattered once) and
the largest logits tensor a step builds (FSDP, and the last stage of a pipeline).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # spawned workers import scenarios/harness by name

import harness  # noqa: E402
import scenarios_chunked  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return harness.spawn(scenarios_chunked.world2, 2, tmp_path_factory.mktemp("chunked"))


@pytest.mark.parametrize("name", scenarios_chunked.NAMES)
def test_chunked_layout(results, name):
    assert name in results, f"scenario {name!r} did not run; ran: {sorted(results)}"
    ok, detail = results[name]
    assert ok, detail


def test_no_unexpected_scenarios(results):
    assert set(results) == set(scenarios_chunked.NAMES)
