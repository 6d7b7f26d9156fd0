"""Silent data corruption, hangs and stragglers across two gloo ranks (two spawned groups, ~60-90 s on 2 busy cores).

The first group runs scenarios_sdc.world2: which tensors each layout can compare (HSDP: all,
TP: the norms, FSDP: none, refused), bit flips injected into rank 1's parameter and optimizer
state and caught at the next check naming rank 1 and the step, the re-computation check (clean,
and with a compute fault on rank 1), a slow rank named a straggler, and the trainer's hooks end
to end. The second group hangs on purpose: rank 1 stalls in step 2 and the watchdog must end the
job with a report naming rank 1, its step and event, and where the other rank waits.
A four-rank group (marked slow, ~80 s) checks the replica groups of FSDP x TP, HSDP x TP (where a
majority names one rank alone) and PP x FSDP (refused).
"""

import json
import sys
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))  # spawned workers import scenarios/harness by name

import harness  # noqa: E402
import scenarios_sdc  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return harness.spawn(scenarios_sdc.world2, 2, tmp_path_factory.mktemp("sdc"))


NAMES = [
    "FSDP 2: nothing comparable is refused",
    "HSDP 2x1: every parameter and its optimizer state compared, clean run passes",
    "HSDP 2x1: a flipped bit in rank 1's parameter is caught at the next check",
    "HSDP 2x1: a flipped bit in rank 1's optimizer state is caught",
    "TP 2: exactly the norms are compared",
    "TP 2: a flipped sign bit in rank 1's norm is caught",
    "FSDP 2: re-computation passes on a clean run",
    "FSDP 2: an injected compute fault on rank 1 is caught and rank 1 named",
    "FSDP 2: without output hashes every rank of the reduction is named",
    "FSDP 2: the slow rank 1 is named a straggler",
    "TP 2: progress events for every local block, forward and backward",
    "PP 2: progress events for every local block, forward and backward",
    "trainer HSDP 2x1: the flip after step 1 stops the run at step 2's replica check",
    "trainer HSDP 2x1: step-time records and heartbeats",
    "trainer HSDP 2x1: a flip between replica checks stops the run before step 2's checkpoint",
    "trainer HSDP 2x1: no checkpoint holds the disagreeing replicas",
]


@pytest.mark.parametrize("name", NAMES)
def test_scenario(results, name):
    assert name in results, f"scenario {name!r} did not run; ran: {sorted(results)}"
    ok, detail = results[name]
    assert ok, detail


def test_no_unexpected_scenarios(results):
    assert set(results) == set(NAMES)


def test_a_stalled_rank_ends_the_job_with_a_report_naming_it(tmp_path):
    t0 = time.time()
    with pytest.raises(mp.ProcessExitedException):
        harness.spawn(scenarios_sdc.hang, 2, tmp_path)
    # Generous: the stall would last 120 s; the watchdog's timeout is 3 s plus process start-up.
    assert time.time() - t0 < 100
    started = min(float((tmp_path / f"started-{r}").read_text()) for r in range(2))
    report = json.loads((tmp_path / "hang-report.json").read_text())
    text = report["report"]
    assert "no progress for 3 s" in text
    assert "Stuck: rank 1" in text and "last completed step 1; in step 2 at 'forward of layers.1'" in text, text
    assert "rank 0" in text and "blocked in the next collective after it" in text, text
    beats = report["heartbeats"]
    assert beats["1"]["step"] == 2 and beats["1"]["event"] == "forward of layers.1"
    assert beats["0"]["step"] == 2 and beats["0"]["event_index"] > beats["1"]["event_index"]
    assert report["heartbeats"]["1"]["time"] - started < 60


NAMES4 = [
    "FSDP 2 x TP 2: the norms, across the TP ranks of one shard",
    "FSDP 2 x TP 2: a flip on rank 3 names ranks 2 and 3 only",
    "HSDP 2 x TP 2: norms across all 4 ranks, projections across the replicas",
    "HSDP 2 x TP 2: a flip on rank 3 names rank 3 alone by majority",
    "HSDP 2 x TP 2: the majority's ranks are not named",
    "PP 2 x FSDP 2: nothing comparable is refused",
]


@pytest.fixture(scope="module")
def results4(tmp_path_factory):
    return harness.spawn(scenarios_sdc.world4, 4, tmp_path_factory.mktemp("sdc4"))


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.parametrize("name", NAMES4)
def test_scenario_world4(results4, name):
    assert name in results4, f"scenario {name!r} did not run; ran: {sorted(results4)}"
    ok, detail = results4[name]
    assert ok, detail


@pytest.mark.slow
@pytest.mark.heavy
def test_no_unexpected_scenarios_world4(results4):
    assert set(results4) == set(NAMES4)
