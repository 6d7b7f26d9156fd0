"""Every 2-rank layout computes what one process computes (one spawned gloo group, ~2 min).

FSDP, TP (+SP, with and without loss parallel), CP (with and without document masks), PP
with each schedule, AC modes, float8, measured communication against the analytic count,
DCP resume under other layouts, and anomaly skips agreed by both ranks; PP with tied embeddings
(scenarios_layouts.py: both schedules, gradient accumulation, the copies bitwise equal,
checkpoints) and ZBV evaluation between training steps. Losses and gradients over 3 AdamW
steps with gradient clipping must match the single-process run within 1e-5 (fp32).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # spawned workers import scenarios/harness by name

import harness  # noqa: E402
import scenarios  # noqa: E402
import scenarios_layouts  # noqa: E402
import scenarios_anomaly  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return harness.spawn(scenarios.world2, 2, tmp_path_factory.mktemp("world2"))


NAMES = (
    [f"{n} docs={d}" for n, d in [("FSDP 2", False), ("FSDP 2 (docs)", True), ("TP 2", True),
                                   ("TP 2 without loss parallel", False), ("CP 2", False), ("CP 2 (docs)", True),
                                   ("FSDP 2 + full AC", True), ("FSDP 2 + selective AC", True),
                                   ("TP 2 + selective AC", True), ("CP 2 + full AC", True)]]
    + [f"PP 2 {s} docs=True" for s in scenarios.PP_SCHEDULES]
    + [f"FSDP 2 + float8 {r} (emulated)" for r in ("tensorwise", "rowwise")]
    + ["TP 2 + float8 rowwise (emulated)", "FSDP 2 bf16 compute"]
    + [f"comm {n}" for n in ("FSDP 2", "TP 2", "CP 2", "PP 2 1F1B", "PP 2 ZBVZeroBubble", "TP 2 + full AC",
                             "TP 2 + selective AC", "CP 2 + selective AC")]
    + ["comm PP 2 1F1B tied"]
    + [f"resume FSDP 2 -> {n}" for n in ("TP 2", "PP 2", "single process")]
    + scenarios_layouts.NAMES2  # tied embeddings under PP, ZBV evaluation between steps
    + [f"anomaly {n}" for n in scenarios_anomaly.CASES]
    + [scenarios_anomaly.RETRY_NAME.format(n) for n in scenarios_anomaly.RETRY_CASES]
    + ["anomaly FSDP 2 Trainer: rollback after NaN gradients on rank 1 equals a run without the window"]
)


@pytest.mark.parametrize("name", NAMES)
def test_layout(results, name):
    assert name in results, f"scenario {name!r} did not run; ran: {sorted(results)}"
    ok, detail = results[name]
    assert ok, detail


def test_no_unexpected_scenarios(results):
    assert set(results) == set(NAMES)
