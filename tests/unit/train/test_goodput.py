"""The effective-time account (herd.train.goodput) against hand-computed numbers, and the metrics
logger's record of the steps a restart cuts."""

import json
import time

import pytest

from herd.train.config import MetricsConfig
from herd.train.goodput import effective_time, process_start_time, record_attempt, record_rollback, write_summary
from herd.train.metrics import MetricsLogger, StepRecord


def write_jsonl(path, rows, *, torn_tail=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text + ('{"step": 9, "lo' if torn_tail else ""))


def step(n, seconds, t):
    return {"step": n, "stage": "pretrain", "loss": 1.0, "seconds": seconds, "time": t}


def test_two_attempts_hand_computed(tmp_path):
    # The run starts at t=100. Attempt 0: trainer at 103, ready at 105, steps 1-4 end at 106..109
    # (1 s each); a checkpoint holds step 2; the process dies during step 5. Attempt 1: trainer at
    # 115 (6 s after the last step end), ready at 118 after a 0.5 s load; steps 3-6 replayed and run,
    # ending at 119..122. Supervisor ends at 125.
    # An older invocation of the same job left step records and an attempt at t < 100: not this run's.
    old = [step(1, 9.0, 50.0)]
    final = [step(1, 1.0, 106), step(2, 1.0, 107), step(3, 1.0, 119), step(4, 1.0, 120),
             step(5, 1.0, 121), step(6, 1.0, 122), {"step": 6, "stage": "pretrain", "val_loss": 1.0}]
    write_jsonl(tmp_path / "metrics.jsonl", final, torn_tail=True)
    record_attempt(tmp_path, attempt=0, started=40.0, ready=41.0, resumed_step=0, load_seconds=0.0, dropped=[])
    record_attempt(tmp_path, attempt=0, started=103.0, ready=105.0, resumed_step=0, load_seconds=0.0,
                   dropped=old)  # cut records of the older run: not replayed by this one
    record_attempt(tmp_path, attempt=1, started=115.0, ready=118.0, resumed_step=2, load_seconds=0.5,
                   dropped=[step(3, 1.0, 108), step(4, 1.0, 109)])
    acc = effective_time(tmp_path, since=100.0, until=125.0)
    assert acc.wall_seconds == 25.0
    assert (acc.productive_steps, acc.productive_seconds) == (6, 6.0)
    assert (acc.attempts, acc.restarts) == (2, 1)
    assert (acc.replayed_steps, acc.replayed_seconds) == (2, 2.0)
    assert acc.startup_seconds == pytest.approx(3.0 + 6.0)  # 100 -> 103, then last step end 109 -> 115
    assert acc.init_seconds == pytest.approx(2.0 + 3.0)
    assert acc.load_seconds == 0.5
    assert acc.other_seconds == pytest.approx(25 - 6 - 2 - 9 - 5)
    assert acc.effective == pytest.approx(6 / 25)
    path = write_summary(tmp_path, acc)
    saved = json.loads(path.read_text())
    assert saved["effective"] == pytest.approx(0.24) and saved["restarts"] == 1
    assert "24.0%" in acc.line() and "1 restart(s)" in acc.line()


def test_attempt_that_died_before_its_first_step(tmp_path):
    # Attempt 0 never stepped; attempt 1's start-up counts from attempt 0's ready time.
    write_jsonl(tmp_path / "metrics.jsonl", [step(1, 2.0, 20.0)])
    record_attempt(tmp_path, attempt=0, started=2.0, ready=4.0, resumed_step=0, load_seconds=0.0, dropped=[])
    record_attempt(tmp_path, attempt=1, started=10.0, ready=12.0, resumed_step=0, load_seconds=0.0, dropped=[])
    acc = effective_time(tmp_path, since=0.0, until=30.0)
    assert acc.startup_seconds == pytest.approx(2.0 + 6.0)
    assert acc.init_seconds == pytest.approx(4.0)
    assert acc.other_seconds == pytest.approx(30 - 2 - 8 - 4)


def test_no_files_is_an_empty_account(tmp_path):
    acc = effective_time(tmp_path, since=0.0, until=0.0)
    assert acc.effective == 0.0 and acc.attempts == 0 and acc.productive_steps == 0


def test_process_start_time_is_before_this_test():
    # pytest has run for a while already; the process cannot have started in the future.
    t = process_start_time()
    assert t <= time.time()
    assert time.time() - t < 24 * 3600


def test_metrics_logger_keeps_the_records_a_restart_cuts(tmp_path):
    rows = [step(n, 0.1 * n, 10.0 + n) for n in range(1, 6)]
    rows.insert(3, {"step": 3, "stage": "pretrain", "val_loss": 2.0})
    write_jsonl(tmp_path / "metrics.jsonl", rows, torn_tail=True)
    cfg = MetricsConfig(tensorboard=False, plot=False, progress=False)
    logger = MetricsLogger(tmp_path, cfg, total_steps=5, start_step=3, stage_bounds=[("pretrain", 0)])
    assert [r["step"] for r in logger.dropped] == [4, 5]
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3, 3]


@pytest.mark.parametrize("resumed", [0, 2])
def test_tensorboard_shows_each_step_once_after_a_restart(tmp_path, resumed):
    # A killed run logged steps 1-4; the restart resumes at `resumed` (0: it died before its first
    # checkpoint) and logs the steps after it again, with other values. TensorBoard's own reader
    # must show steps 1-4 once each, the replayed ones with the new values.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = MetricsConfig(tensorboard=True, plot=False, progress=False, log_every=100)

    def run(start, values):
        logger = MetricsLogger(tmp_path, cfg, total_steps=4, start_step=start, stage_bounds=[("pretrain", 0)])
        for n in range(start + 1, 5):
            logger.log_step(StepRecord(step=n, stage="pretrain", loss=values + n, lr=1e-3, grad_norm=1.0,
                                       tokens_seen=n, batch_tokens=1, seq_len=1, tokens_per_s=1.0, mfu=0.0,
                                       seconds=0.1, time=float(n)))
        logger.close()

    run(0, 10.0)
    run(resumed, 20.0)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    shown = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert shown == [(n, (10.0 if n <= resumed else 20.0) + n) for n in range(1, 5)]


def test_an_anomaly_rollback_counts_its_cut_steps_as_replayed(tmp_path):
    # One process: steps 1-5, a rollback to step 2 cuts 3-5 (1 s each), they run again (6 s from 20).
    write_jsonl(tmp_path / "metrics.jsonl", [step(1, 1.0, 11), step(2, 1.0, 12), step(3, 2.0, 22), step(4, 2.0, 24),
                                             step(5, 2.0, 26)])
    record_attempt(tmp_path, attempt=0, started=5.0, ready=10.0, resumed_step=0, load_seconds=0.0, dropped=[])
    record_rollback(tmp_path, dropped=[step(3, 1.0, 13), step(4, 1.0, 14), step(5, 1.0, 15)])
    acc = effective_time(tmp_path, since=0.0, until=30.0)
    assert (acc.attempts, acc.restarts) == (1, 0)  # a rollback is no restart
    assert (acc.replayed_steps, acc.replayed_seconds) == (3, 3.0)
    assert (acc.productive_steps, acc.productive_seconds) == (5, 8.0)
    assert acc.other_seconds == pytest.approx(30 - 8 - 3 - 5 - 5)


def test_metrics_logger_rewind_returns_the_cut_step_records(tmp_path):
    cfg = MetricsConfig(tensorboard=False, plot=False, progress=False, log_every=100)
    logger = MetricsLogger(tmp_path, cfg, total_steps=5, start_step=0, stage_bounds=[("pretrain", 0)])
    for n in range(1, 5):
        logger.log_step(StepRecord(step=n, stage="pretrain", loss=1.0, lr=1e-3, grad_norm=1.0, tokens_seen=n,
                                   batch_tokens=1, seq_len=1, tokens_per_s=1.0, mfu=0.0, seconds=0.5, time=float(n)))
    assert [r["step"] for r in logger.rewind(2)] == [3, 4]
    logger.close()
