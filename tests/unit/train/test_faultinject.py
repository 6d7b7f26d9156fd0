"""Injected faults (herd.train.faultinject): the spec's errors, fire-once across restarts, the rank
and step they fire at, and a kill that is a real SIGKILL."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from herd.train import faultinject
from herd.train.faultinject import ENV, hooks, hooks_from_env, parse

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("spec, problem", [
    ("{", "not JSON"),
    ('{"faults": []}', "\"state\""),
    ('{"state": "/x", "faults": [{"kind": "melt", "step": 1}]}', "kind must be one of"),
    ('{"state": "/x", "faults": [{"kind": "kill", "step": 0}]}', "step must be an integer >= 1"),
    ('{"state": "/x", "faults": [{"kind": "kill", "step": 2, "rank": -1}]}', "rank >= 0"),
])
def test_bad_specs_say_what_is_wrong(spec, problem):
    with pytest.raises(ValueError, match=problem):
        parse(spec)


def test_no_env_no_hooks(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert hooks_from_env() == []


def test_faults_fire_once_at_their_rank_and_step(tmp_path, monkeypatch):
    fired = []
    monkeypatch.setitem(faultinject.KINDS, "record", lambda f: lambda trainer, step: fired.append((f.index, step)))
    spec = {"state": str(tmp_path / "state"), "faults": [
        {"kind": "record", "step": 2}, {"kind": "record", "step": 3, "rank": 1}, {"kind": "record", "step": 3}]}
    monkeypatch.setenv(ENV, json.dumps(spec))
    (hook,) = hooks_from_env()
    for step in (1, 2, 3, 2, 3):  # steps 2-3 replayed, as after a restart
        hook(None, step)
    assert fired == [(0, 2), (2, 3)]  # rank 1's fault is not this process's (rank 0)
    # A restarted process builds its hooks again from the same environment: still nothing twice.
    (again,) = hooks(*parse(json.dumps(spec)))
    again(None, 2)
    assert fired == [(0, 2), (2, 3)]


def test_kill_is_sigkill(tmp_path):
    spec = json.dumps({"state": str(tmp_path), "faults": [{"kind": "kill", "step": 4}]})
    code = ("import os; from herd.train.faultinject import hooks_from_env\n"
            "(h,) = hooks_from_env()\n"
            "for s in range(1, 10): h(None, s); print(s, flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(ROOT), ENV: spec},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split() == ["1", "2", "3"]
