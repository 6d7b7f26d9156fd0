"""SDC checks in one process: the checksum, the mismatch and straggler rules, the trainer's hooks.

The distributed cases (replicas under HSDP and TP, hangs, stragglers across ranks) are in
tests/distributed/test_sdc.py.
"""

import json
import zlib

import numpy as np
import pytest
import torch

from herd.data.shards import ShardWriter
from herd.train.checkpoint import CheckpointVerifyError, verify
from herd.train.config import config_from_dict
from herd.train.sdc import (
    Fault,
    Faults,
    SilentDataCorruption,
    find_mismatches,
    flip_bit,
    recompute_check,
    tensor_checksum,
)
from herd.train.trainer import Trainer
from herd.train.watchdog import find_stragglers, hang_report

# ---- the checksum ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8])
def test_every_single_bit_flip_changes_the_checksum_and_flipping_back_restores_it(dtype):
    t = (torch.randn(257, generator=torch.Generator().manual_seed(0)) * 50).to(dtype)
    base = tensor_checksum(t)
    assert tensor_checksum(t.clone()) == base  # equal bits, equal checksum
    for index in (0, 128, 256):
        for bit in range(8 * t.element_size()):
            u = t.clone()
            flip_bit(u, index=index, bit=bit)
            # The flip is exactly one bit, checked on the raw bytes independently of the checksum.
            diff = t.view(torch.uint8).numpy() ^ u.view(torch.uint8).numpy()
            assert sum(bin(int(b)).count("1") for b in diff) == 1
            assert tensor_checksum(u) != base, (dtype, index, bit)
            flip_bit(u, index=index, bit=bit)
            assert tensor_checksum(u) == base


def test_checksum_sees_order_and_strides_but_not_the_memory_layout():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    swapped = t.flatten().clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert tensor_checksum(swapped) != tensor_checksum(t)
    # A transposed view hashes its logical order: the same as a contiguous copy of it.
    assert tensor_checksum(t.T) == tensor_checksum(t.T.contiguous())
    # Large tensors go in chunks of 2**22; the value is the documented formula, computed here in
    # Python integers: per chunk c, sum of int32(x_i * (2i+1) mod 2**32), times 2c+1, mod 2**64.
    big = torch.randn((1 << 22) + 5, generator=torch.Generator().manual_seed(1))
    words = big.view(torch.int32).numpy().astype(np.int64)
    total = 0
    for c, start in enumerate(range(0, len(words), 1 << 22)):
        x = words[start:start + (1 << 22)]
        prod = (x * (np.arange(len(x), dtype=np.int64) * 2 + 1)) & 0xFFFFFFFF  # exact: |x| < 2**31, i < 2**22
        prod = np.where(prod >= 1 << 31, prod - (1 << 32), prod)  # back to signed int32
        total += int(prod.sum()) * (2 * c + 1)
    total %= 1 << 64
    assert tensor_checksum(big) % (1 << 64) == total
    # Swapping the same position of two chunks changes it too (the chunk weights differ).
    swapped = big.clone()
    swapped[[3, (1 << 22) + 3]] = swapped[[(1 << 22) + 3, 3]]
    assert tensor_checksum(swapped) != tensor_checksum(big)


def test_flip_bit_rejects_positions_outside_the_tensor():
    with pytest.raises(ValueError, match="outside a tensor of 4 elements of 32 bits"):
        flip_bit(torch.zeros(4), index=4)
    with pytest.raises(ValueError, match="bit 32"):
        flip_bit(torch.zeros(4), bit=32)


# ---- the rules ---------------------------------------------------------------------------------


def test_find_mismatches_names_the_minority_or_every_rank_of_an_even_split():
    g3, g2 = (0, 1, 2), (3, 4)
    reports = [{"param a": (g3, 7)}, {"param a": (g3, 7)}, {"param a": (g3, 9)},
               {"param b": (g2, 1)}, {"param b": (g2, 2)}]
    (a, b) = find_mismatches(reports)
    assert (a.name, a.ranks, a.majority) == ("param a", [2], True)
    assert (b.name, b.ranks, b.majority) == ("param b", [3, 4], False)
    assert "rank 2 differs from the majority" in a.describe()
    assert "no majority" in b.describe()
    assert find_mismatches([{"param a": ((0, 1), 5)}] * 2 + [{}]) == []


def test_straggler_rule_uses_the_low_median():
    assert find_stragglers([1.0, 1.1, 0.9, 2.0], 1.5) == [3]
    assert find_stragglers([1.0, 1.4], 1.5) == []  # within the factor of the faster rank
    assert find_stragglers([0.1, 1.0], 1.5) == [1]  # two ranks: compared with the faster one
    assert find_stragglers([2.0, 2.0, 2.0], 1.5) == []
    assert find_stragglers([3.0], 1.5) == []


def test_hang_report_names_the_rank_furthest_behind():
    beat = dict(host="h", pid=1, in_step=True, time=100.0)
    beats = {0: {**beat, "rank": 0, "step": 3, "event": "forward of layers.0 done", "event_index": 4,
                 "event_time": 90.0},
             1: {**beat, "rank": 1, "step": 3, "event": "step start", "event_index": 1, "event_time": 89.0},
             2: None}
    text = hang_report(beats, world=3, timeout_s=5, now=100.0)
    assert "Stuck: rank 1 (h, pid 1): last completed step 2; in step 3 at 'step start' for 11.0 s" in text
    assert "rank 0 (h): last completed step 2; in step 3, last completed 'forward of layers.0 done' 10.0 s ago" in text
    assert "Stuck: rank 2 wrote no heartbeat" in text


@pytest.mark.parametrize("section, key, value", [("sdc", "replica_check_every", -1), ("sdc", "recompute_every", -2),
                                                 ("watchdog", "collective_timeout_s", -1.0),
                                                 ("watchdog", "straggler_every", -1),
                                                 ("watchdog", "straggler_factor", 1.0)])
def test_bad_values_are_rejected_naming_the_key(tmp_path, section, key, value):
    with pytest.raises(ValueError, match=f"{section}.{key}"):
        config_from_dict(_config(tmp_path, **{section: {key: value}}))


def test_faults_from_the_environment_are_checked(monkeypatch):
    monkeypatch.setenv("HERD_SDC_FAULTS", json.dumps([{"kind": "flip_param", "step": 2, "rank": 1, "name": "x"}]))
    (f,) = Faults.from_env().faults
    assert (f.kind, f.step, f.rank, f.options) == ("flip_param", 2, 1, {"name": "x"})
    monkeypatch.setenv("HERD_SDC_FAULTS", json.dumps([{"kind": "melt", "step": 1}]))
    with pytest.raises(ValueError, match="unknown fault kind 'melt'"):
        Faults.from_env()
    monkeypatch.setenv("HERD_SDC_FAULTS", "{")
    with pytest.raises(ValueError, match="HERD_SDC_FAULTS is not JSON"):
        Faults.from_env()


def test_recompute_check_compares_two_passes_bitwise():
    model = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8)
    params = list(model.named_parameters())
    runs = []

    def run():
        runs.append(1)
        model(x).square().sum().backward()

    def zero():
        model.zero_grad(set_to_none=True)

    assert recompute_check(1, run, params, zero) == 2 and len(runs) == 2
    assert all(p.grad is None for _, p in params)

    class Perturb:  # a faulty multiply in the first pass: one bit of the output
        def __enter__(self):
            self.h = model.register_forward_hook(lambda m, a, out: _flipped(out), prepend=True)

        def __exit__(self, *exc):
            self.h.remove()

    with pytest.raises(SilentDataCorruption, match=r"re-computation at step 7: rank 0 .*\n  rank 0: bias, weight"):
        recompute_check(7, run, params, zero, corrupt_first=Perturb)
    # With the model's output hashed too, the rank whose own forward differed is named as the faulty one.
    with pytest.raises(SilentDataCorruption, match=r"rank 0 \(.*\) computed two different forward outputs(.|\n)*"
                                                   r"  rank 0: forward output, bias, weight"):
        recompute_check(7, run, params, zero, outputs=[model], corrupt_first=Perturb)
    assert recompute_check(8, run, params, zero, outputs=[model]) == 2


def _flipped(out):
    out = out.clone()
    flip_bit(out, index=0, bit=30)
    return out


# ---- the trainer's hooks (one process) ---------------------------------------------------------


def _config(tmp_path, **sections):
    cfg = {"job": {"out_dir": str(tmp_path / "out"), "device": "cpu"}, "model": {"preset": "debug", "n_layers": 2},
           "data": {"train": [str(tmp_path / "shards")]},
           "metrics": {"tensorboard": False, "plot": False, "progress": False},
           "checkpoint": {"every": 2, "keep_last": 3},
           "stages": [{"name": "p", "steps": 4, "ramp": [[0, 64, 16]]}]}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


@pytest.fixture
def shards(tmp_path):
    with ShardWriter(tmp_path / "shards", vocab_size=256) as w:
        for i in range(40):
            w.add([(i * 7 + j) % 256 for j in range(30)])
    return tmp_path


def _losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_recompute_check_passes_a_clean_run_without_changing_it(shards):
    torch.set_num_threads(1)
    plain = Trainer(config_from_dict(_config(shards, job={"out_dir": str(shards / "plain")})), log=lambda m: None)
    plain.fit()
    checked = Trainer(config_from_dict(_config(shards, sdc={"recompute_every": 1})), log=lambda m: None)
    checked.fit()
    assert _losses(shards / "out") == _losses(shards / "plain")  # bitwise: the checks touch no state


def test_recompute_check_stops_the_run_at_an_injected_fault(shards):
    torch.set_num_threads(1)
    faults = Faults([Fault("corrupt_compute", step=2, rank=0, options={"bit": 12})])
    t = Trainer(config_from_dict(_config(shards, sdc={"recompute_every": 2})), log=lambda m: None, faults=faults)
    with pytest.raises(SilentDataCorruption, match="re-computation at step 2: rank 0"):
        t.fit()
    assert t.step == 1  # step 2's update never ran


def test_replica_check_in_one_process_is_refused_with_the_fix(shards):
    with pytest.raises(ValueError, match="no rank holds a replicated tensor.*sdc.replica_check_every = 0"):
        Trainer(config_from_dict(_config(shards, sdc={"replica_check_every": 1})), log=lambda m: None)


def test_a_checkpoint_corrupted_on_disk_after_its_write_stops_the_run(shards):
    torch.set_num_threads(1)
    faults = Faults([Fault("corrupt_checkpoint", step=4)])
    t = Trainer(config_from_dict(_config(shards)), log=lambda m: None, faults=faults)
    with pytest.raises(CheckpointVerifyError, match=r"step-00000004 failed its check right after the write: "
                                                    r".*fails its CRC-32 check"):
        t.fit()
    root = shards / "out" / "checkpoints"
    (aside,) = root.glob("step-00000004.bad-*")
    assert verify(aside)[0] is None and verify(root / "step-00000002")[0] is not None
    # The manifest's CRCs are independent of the check: recomputed here with zlib over the good file.
    meta = json.loads((root / "step-00000002" / "COMPLETE").read_text())
    for name, (size, crc) in meta["files"].items():
        assert zlib.crc32((root / "step-00000002" / name).read_bytes()) == crc
    # Without verification the corrupt checkpoint would have been taken as good until a restart.
    faults = Faults([Fault("corrupt_checkpoint", step=4)])
    cfg = _config(shards, job={"out_dir": str(shards / "unverified")}, sdc={"verify_checkpoints": False})
    Trainer(config_from_dict(cfg), log=lambda m: None, faults=faults).fit()
    assert verify(shards / "unverified" / "checkpoints" / "step-00000004")[0] is None


def test_straggler_record_in_one_process(shards):
    torch.set_num_threads(1)
    t = Trainer(config_from_dict(_config(shards, watchdog={"straggler_every": 2})), log=lambda m: None)
    t.fit()
    recs = [r for r in map(json.loads, (shards / "out" / "metrics.jsonl").read_text().splitlines())
            if r.get("event") == "step_times"]
    assert [r["step"] for r in recs] == [2, 4]
    assert all(len(r["rank_step_s"]) == 1 and r["stragglers"] == [] for r in recs)
    assert 0 < recs[0]["rank_busy_s"][0] < recs[0]["rank_step_s"][0]  # block forwards are part of the step


def test_cli_exits_4_with_the_message_and_no_traceback(shards, monkeypatch, capsys):
    from herd.cli import main
    from herd.train.config import to_toml

    torch.set_num_threads(1)
    cfg = shards / "run.toml"
    cfg.write_text(to_toml(config_from_dict(_config(shards, sdc={"recompute_every": 1}))))
    monkeypatch.setenv("HERD_SDC_FAULTS", json.dumps([{"kind": "corrupt_compute", "step": 3, "rank": 0}]))
    with pytest.raises(SystemExit) as e:
        main(["train", str(cfg)])
    assert e.value.code == 4
    err = capsys.readouterr().err
    assert "herd train: silent data corruption detected by the gradient re-computation at step 3: rank 0" in err
    assert "Traceback" not in err
