"""All four dimensions at once, and the 3-D product without data parallelism (spawned gloo groups).

TP 2 x CP 2 x PP 2 (8 ranks) and FSDP 2 x PP 2 x CP 2 x TP 2 (16 ranks, also under
ZBVZeroBubble with full AC) with document masks, and each with tied embeddings: losses and
gradients over 3 AdamW steps equal one process within 1e-5 (fp32), see scenarios_layouts.py.
On a 2-core CPU the 16 processes mostly wait on each other: the 16-rank group is marked slow.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # spawned workers import scenarios/harness by name

import harness  # noqa: E402
import scenarios_layouts  # noqa: E402


def _check(results, names):
    assert set(results) == set(names), f"ran {sorted(results)}"
    bad = {n: results[n][1] for n in names if not results[n][0]}
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.heavy
def test_tp_cp_pp_8_ranks(tmp_path):
    _check(harness.spawn(scenarios_layouts.world8, 8, tmp_path), scenarios_layouts.NAMES8)


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.timeout(1800)  # 16 processes on 2 cores: longer than the suite's 10-minute hang guard
def test_fsdp_pp_cp_tp_16_ranks(tmp_path):
    _check(harness.spawn(scenarios_layouts.world16, 16, tmp_path), scenarios_layouts.NAMES16)
