"""herd.parallel.torchrun: torchrun itself, ending a deliberate stop with the shell's status
instead of torchrun's traceback, and leaving every other failure to torchrun's own report."""

import signal

import pytest
import torch.distributed.run
from torch.distributed.elastic.multiprocessing.api import SignalException

from herd.parallel import torchrun


def test_a_stop_signal_ends_with_128_plus_its_number(monkeypatch):
    def stopped():
        raise SignalException("Process 1 got signal: 15", sigval=signal.SIGTERM)

    monkeypatch.setattr(torch.distributed.run, "main", stopped)
    assert torchrun.main() == 128 + 15


def test_other_failures_keep_their_traceback(monkeypatch):
    def broken():
        raise RuntimeError("rendezvous failed")

    monkeypatch.setattr(torch.distributed.run, "main", broken)
    with pytest.raises(RuntimeError, match="rendezvous failed"):
        torchrun.main()


def test_a_finished_job_is_status_0(monkeypatch):
    monkeypatch.setattr(torch.distributed.run, "main", lambda: None)
    assert torchrun.main() == 0
