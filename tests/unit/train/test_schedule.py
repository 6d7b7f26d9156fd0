"""Learning rate and batch shape at hand-computed points."""

import math

import pytest

from herd.train.config import config_from_dict
from herd.train.schedule import Schedule, batch_shape


def schedule(stages, **sched):
    cfg = config_from_dict({"data": {"train": ["x"]}, "optim": {"lr": 8e-5},
                            "schedule": {"warmup_steps": 10, "min_lr": 8e-7, **sched},
                            "checkpoint": {"every": 1}, "stages": stages})
    return Schedule.from_config(cfg)


PRETRAIN = {"name": "pretrain", "steps": 110, "ramp": [[0, 64, 64]]}
ANNEAL = {"name": "anneal", "steps": 4, "ramp": [[0, 64, 64]], "lr": "linear_to_zero"}


def test_warmup_is_linear_from_peak_over_warmup_to_peak():
    s = schedule([PRETRAIN])
    assert s.lr(0) == pytest.approx(8e-6)
    assert s.lr(4) == pytest.approx(4e-5)
    assert s.lr(9) == pytest.approx(8e-5)


def test_cosine_midpoint_and_floor():
    s = schedule([PRETRAIN], decay_steps=100)
    assert s.lr(10) == pytest.approx(8e-5)  # progress 0
    assert s.lr(60) == pytest.approx(8e-7 + (8e-5 - 8e-7) * 0.5)  # progress 1/2: cos(pi/2) = 0
    assert s.lr(35) == pytest.approx(8e-7 + (8e-5 - 8e-7) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert s.lr(110) == pytest.approx(8e-7)  # progress 1
    assert s.lr(500) == pytest.approx(8e-7)  # held at the floor


def test_decay_defaults_to_the_end_of_the_cosine_stages():
    s = schedule([PRETRAIN, ANNEAL])
    assert s.decay_steps == 100  # 110 cosine steps - 10 warmup; the annealing stage is not cosine
    assert s.lr(109) > 8e-7
    assert s.lr(110) == pytest.approx(8e-7) and s.lr(111) == pytest.approx(6e-7)  # anneal starts at the floor


def test_anneal_is_linear_to_zero_from_the_cosine_value_at_its_start():
    s = schedule([PRETRAIN, ANNEAL], decay_steps=200)
    base = 8e-7 + (8e-5 - 8e-7) * 0.5 * (1 + math.cos(math.pi * 100 / 200))  # cosine at step 110
    assert [s.lr(110 + i) for i in range(4)] == pytest.approx([base, base * 3 / 4, base / 2, base / 4])
    assert s.stage_at(113).name == "anneal" and s.stage_at(109).name == "pretrain"
    assert s.total_steps == 114


def test_ramp_switches_at_the_token_thresholds():
    ramp = [[0, 4_194_304, 4096], [252_000_000, 8_388_608, 8192], [2_870_000_000_000, 16_777_216, 8192]]
    assert batch_shape(ramp, 0).rows == 1024 and batch_shape(ramp, 0).seq_len == 4096
    assert batch_shape(ramp, 251_999_999).batch_tokens == 4_194_304
    assert batch_shape(ramp, 252_000_000).batch_tokens == 8_388_608
    assert batch_shape(ramp, 252_000_000).seq_len == 8192
    assert batch_shape(ramp, 2_870_000_000_000).batch_tokens == 16_777_216
    assert batch_shape(ramp, 10**15).rows == 2048
