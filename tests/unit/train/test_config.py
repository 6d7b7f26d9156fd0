"""TOML configs: typed loading, --section.key overrides, and errors that name the key."""

from pathlib import Path

import pytest

from herd.train.config import Config, apply_override, config_from_dict, load_config, parse_overrides, to_toml

# The run presets of `herd train` (configs/ also holds other commands' files).
CONFIGS = [Path(__file__).resolve().parents[3] / "configs" / name for name in ("debug.toml", "llama3_8b_pretrain.toml")]
MINIMAL = """
[data]
train = ["shards/train"]

[[stages]]
name = "pretrain"
steps = 10
ramp = [[0, 1024, 64]]
"""


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.stages and cfg.model.args().num_params() > 0


def test_defaults_and_types(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert isinstance(cfg, Config)
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.weight_decay == 0.1 and cfg.optim.grad_clip == 1.0
    assert cfg.stages[0].ramp == [[0, 1024, 64]] and cfg.stages[0].lr == "cosine"


def test_overrides_are_parsed_to_the_field_type(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["--optim.lr", "3e-4", "--job.seed=7", "--metrics.tensorboard",
                                                 "false", "--stages.pretrain.steps", "20", "--data.train", "a,b",
                                                 "--optim.betas", "[0.8, 0.9]", "--model.dim", "128",
                                                 "--stages.0.lr", "linear_to_zero"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.job.seed == 7 and cfg.metrics.tensorboard is False
    assert cfg.stages[0].steps == 20 and cfg.stages[0].lr == "linear_to_zero"
    assert cfg.data.train == ["a", "b"] and cfg.optim.betas == [0.8, 0.9]
    assert cfg.model.args().dim == 128


def test_an_int_where_a_float_is_declared_is_accepted(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["--optim.lr", "1"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("text, message", [
    (MINIMAL + "\n[optim]\nlrr = 1e-3\n", "unknown key optim.lrr in [optim]; valid keys: lr, betas"),
    (MINIMAL + "\n[optimizer]\nlr = 1e-3\n", "unknown key optimizer in the top level; valid keys: job, model"),
    (MINIMAL + "\n[optim]\nlr = \"fast\"\n", "optim.lr: expected a number, got 'fast'"),
    (MINIMAL + "\n[job]\nseed = 1.5\n", "job.seed: expected an integer, got 1.5"),
    (MINIMAL.replace('steps = 10', 'steps = 10\nlr = "step"'),
     "stages.pretrain.lr: 'step' is not one of 'cosine', 'linear_to_zero'"),
    (MINIMAL.replace('steps = 10', 'steps = 10\nwarmup = 3'), "unknown key stages.pretrain.warmup"),
    (MINIMAL.replace("[[0, 1024, 64]]", "[[0, 1000, 64]]"), "batch_tokens must be a positive multiple of seq_len"),
    (MINIMAL.replace("[[0, 1024, 64]]", "[[5, 1024, 64]]"), "must start with a row [0, batch_tokens, seq_len]"),
    (MINIMAL.replace("[[0, 1024, 64]]", "[[0, 1024, 512]]"), "seq_len 512 exceeds the model's max_seq_len 256"),
    (MINIMAL.replace('steps = 10', 'steps = 10\naverage_last = 2'), "average_last is 2 but the stage writes only 1"),
    (MINIMAL.replace('train = ["shards/train"]', 'train = []'), "data.train is empty"),
    ("[model]\npreset = \"llama5\"\n" + MINIMAL, "model.preset: unknown preset 'llama5'; valid:"),
], ids=lambda v: v if len(v) < 40 and "\n" not in v else "")
def test_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(ValueError) as e:
        load_config(write(tmp_path, text))
    assert message in str(e.value)


@pytest.mark.parametrize("override, message", [
    (["--optim.lr", "abc"], "optim.lr: expected a number, got 'abc'"),
    (["--optim.lrr", "1"], "--optim.lrr: unknown key 'lrr'; valid keys: lr, betas, eps, weight_decay, grad_clip"),
    (["--optimizer.lr", "1"], "unknown section 'optimizer'; valid sections:"),
    (["--stages.anneal.steps", "3"], "no stage 'anneal'; stages are ['pretrain']"),
    (["--metrics.plot", "maybe"], "metrics.plot: expected true or false"),
    (["--optim.lr"], "override --optim.lr has no value"),
    (["lr=3"], "expected an override --section.key VALUE"),
])
def test_override_errors_name_the_key(tmp_path, override, message):
    with pytest.raises(ValueError) as e:
        load_config(write(tmp_path, MINIMAL), override)
    assert message in str(e.value)


def test_missing_file_says_where_presets_are(tmp_path):
    with pytest.raises(FileNotFoundError, match="configs/"):
        load_config(tmp_path / "nope.toml")


def test_to_toml_round_trips(tmp_path):
    cfg = load_config(CONFIGS[0])
    again = load_config(write(tmp_path, to_toml(cfg)))
    assert again == cfg


def test_stage_args_accumulate_rope_changes():
    cfg = config_from_dict({
        "model": {"preset": "debug", "max_seq_len": 128}, "data": {"train": ["x"]},
        "stages": [{"name": "a", "steps": 1, "ramp": [[0, 128, 64]]},
                   {"name": "b", "steps": 1, "ramp": [[0, 256, 256]], "max_seq_len": 256, "rope_theta": 1e6},
                   {"name": "c", "steps": 1, "ramp": [[0, 512, 512]], "max_seq_len": 512, "rope_scaling_factor": 2.0}]})
    a, b, c = (cfg.stage_args(i) for i in range(3))
    assert (a.max_seq_len, a.rope_theta) == (128, 500000.0)
    assert (b.max_seq_len, b.rope_theta) == (256, 1e6)
    assert (c.max_seq_len, c.rope_theta, c.rope_scaling.factor, c.rope_scaling.original_max_seq_len) == (512, 1e6, 2.0, 256)


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b", "1", "--c.d=x=y"]) == [("a.b", "1"), ("c.d", "x=y")]
    base = config_from_dict({"data": {"train": ["x"]}, "stages": [{"name": "p", "steps": 1, "ramp": [[0, 64, 64]]}]})
    apply_override(base, "model.n_kv_heads", "none")
    assert base.model.n_kv_heads is None
