"""Every 4-rank layout computes what one process computes (one spawned gloo group, ~2 min).

HSDP 2x2, FSDP x TP, CP x TP, PP x FSDP, FSDP x CP, PP x TP, CP x PP (with document masks,
also under ZBVZeroBubble with full AC), and PP x FSDP / PP x TP / PP 4 with tied embeddings:
losses and gradients over 3 AdamW steps equal the single-process run within 1e-5 (fp32); the
measured communication (also of CP x PP and of tied PP x FSDP) equals
the analytic count; a checkpoint saved with FSDP 2 x TP 2 resumes under FSDP 4, HSDP and in
one process with the continuing losses of an uninterrupted run; the chunked output head
(train.loss_chunks = 4) under HSDP, FSDP x TP, FSDP x CP, PP x FSDP and PP x TP equals the plain
single-process run, and adds no PP x FSDP traffic.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # spawned workers import scenarios/harness by name

import harness  # noqa: E402
import scenarios  # noqa: E402
import scenarios_chunked  # noqa: E402
import scenarios_layouts  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return harness.spawn(scenarios.world4, 4, tmp_path_factory.mktemp("world4"))


NAMES = (
    [f"{n} docs={d}" for n, d in [("HSDP 2x2", True), ("FSDP 2 x TP 2", True), ("CP 2 x TP 2", True),
                                   ("PP 2 x FSDP 2", True), ("FSDP 2 x CP 2", True), ("PP 2 x TP 2", False)]]
    + [f"comm {n}" for n in ("HSDP 2x2", "FSDP 2 x TP 2", "CP 2 x TP 2", "PP 2 x FSDP 2", "CP 2 x PP 2",
                             "PP 2 x FSDP 2 tied")]
    + scenarios_layouts.NAMES4  # CP x PP with document masks, tied embeddings under PP x FSDP and PP x TP
    + [f"resume FSDP 2 x TP 2 -> {n}" for n in ("FSDP 4", "HSDP 2x2", "single process")]
    + scenarios_chunked.NAMES4  # the output head in chunks under the 4-rank products
)


@pytest.mark.parametrize("name", NAMES)
def test_layout(results, name):
    assert name in results, f"scenario {name!r} did not run; ran: {sorted(results)}"
    ok, detail = results[name]
    assert ok, detail


def test_no_unexpected_scenarios(results):
    assert set(results) == set(NAMES)
