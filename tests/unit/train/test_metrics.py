import json

import torch

from herd.train.metrics import measure_matmul_peak


def test_matmul_peak_is_measured_once_per_process(monkeypatch):
    cpu = torch.device("cpu")
    first = measure_matmul_peak(cpu, torch.float32, size=256, seconds=0.05)
    # A 256^3 matmul is ~33.5 MFLOP: any real machine does it at well over 0.1 GFLOP/s and far
    # under 100 TFLOP/s.
    assert 1e8 < first < 1e14
    # "Measured once" means the second call builds no operands at all. Counting that, rather than
    # timing the call, cannot flake on a loaded machine.
    randn, made = torch.randn, []
    monkeypatch.setattr(torch, "randn", lambda *a, **k: made.append(a) or randn(*a, **k))
    again = measure_matmul_peak(cpu, torch.float32, size=256, seconds=0.05)
    assert again == first and made == []
    fresh = measure_matmul_peak(cpu, torch.float32, size=256, seconds=0.05, cached=False)
    assert 1e8 < fresh < 1e14
    assert len(made) == 2  # the count does see a real measurement (a and b)
    assert measure_matmul_peak(cpu, torch.float32, size=256) == first  # a fresh reading does not replace it


def test_a_cache_file_keeps_the_peak_across_processes_and_is_keyed_by_threads(monkeypatch, tmp_path):
    from herd.train import metrics

    cpu, cache = torch.device("cpu"), tmp_path / "peak.json"
    randn, made = torch.randn, []
    monkeypatch.setattr(torch, "randn", lambda *a, **k: made.append(a) or randn(*a, **k))
    monkeypatch.setattr(metrics, "_PEAKS", {})  # a fresh process
    first = measure_matmul_peak(cpu, torch.float32, size=128, seconds=0.02, cache_file=cache)
    assert len(made) == 2 and list(json.loads(cache.read_text()).values()) == [first]
    monkeypatch.setattr(metrics, "_PEAKS", {})  # a restarted process: read back, nothing measured
    assert measure_matmul_peak(cpu, torch.float32, size=128, cache_file=cache) == first and len(made) == 2
    threads = torch.get_num_threads()
    monkeypatch.setattr(metrics, "_PEAKS", {})
    torch.set_num_threads(threads + 1)  # other hardware settings: another key, measured again
    try:
        measure_matmul_peak(cpu, torch.float32, size=128, seconds=0.02, cache_file=cache)
    finally:
        torch.set_num_threads(threads)
    assert len(made) == 4 and len(json.loads(cache.read_text())) == 2
    cache.write_text("{not json")  # damaged: measured again and rewritten, never an error
    monkeypatch.setattr(metrics, "_PEAKS", {})
    measure_matmul_peak(cpu, torch.float32, size=128, seconds=0.02, cache_file=cache)
    assert len(made) == 6 and len(json.loads(cache.read_text())) == 1
