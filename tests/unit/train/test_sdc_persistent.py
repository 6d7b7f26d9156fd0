"""A silent data corruption that comes back after the restart meant to cure it: recorded per job,
named by step and ranks, and the supervisor ends torchrun instead of spending every restart."""

import json
import subprocess
import sys
import time

from herd.parallel.launch import wait_unless_stopped
from herd.train.sdc import SDC_EVENTS, SilentDataCorruption, record_event, write_stop


def _sdc(step, ranks):
    return SilentDataCorruption(f"silent data corruption detected by the replica checksum check at step {step}: ...",
                                step=step, ranks=ranks)


def test_the_same_step_and_ranks_twice_in_one_job_is_persistent(tmp_path):
    assert record_event(tmp_path, _sdc(4, [1]), job="j1") is None  # the first time: restart and recover
    assert record_event(tmp_path, _sdc(6, [1]), job="j1") is None  # another step: another one-time fault
    assert record_event(tmp_path, _sdc(4, [0, 1]), job="j1") is None  # other ranks named
    assert record_event(tmp_path, _sdc(4, [1]), job="j2") is None  # a new invocation of the job
    msg = record_event(tmp_path, _sdc(4, [1]), job="j1")
    assert msg is not None and "step 4 on rank 1" in msg
    assert "likely faulty hardware: exclude rank 1's host" in msg and SDC_EVENTS in msg
    events = [json.loads(line) for line in (tmp_path / SDC_EVENTS).read_text().splitlines()]
    assert [(e["job"], e["step"], e["ranks"]) for e in events] == [
        ("j1", 4, [1]), ("j1", 6, [1]), ("j1", 4, [0, 1]), ("j2", 4, [1]), ("j1", 4, [1])]
    two = record_event(tmp_path, _sdc(4, [1, 0]), job="j1")  # order does not matter
    assert "rank 0, rank 1" in two and "rank 0's host or rank 1's host" in two


def test_a_torn_line_in_the_record_is_ignored(tmp_path):
    (tmp_path / SDC_EVENTS).write_text('{"job": "j", "step": 4, "ranks": [1]}\n{"job": "j", "st')
    assert record_event(tmp_path, _sdc(4, [1]), job="j") is not None


def test_the_stop_file_ends_the_supervised_process(tmp_path):
    stop = tmp_path / "sdc-stop.json"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    t = time.monotonic()
    write_stop(tmp_path, "persistent")
    assert wait_unless_stopped(proc, stop, poll_s=0.05) != 0
    assert time.monotonic() - t < 60 and json.loads(stop.read_text())["message"] == "persistent"
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    assert wait_unless_stopped(done, tmp_path / "absent", poll_s=0.05) == 0


def test_an_error_without_a_step_still_records(tmp_path):
    assert record_event(tmp_path, SilentDataCorruption("x"), job="j") is None
    assert "an unnamed rank" in record_event(tmp_path, SilentDataCorruption("x"), job="j")
