"""Checks before the first step: the shards' vocabulary against the model, and sizes at config load."""

import pytest

from herd.data.shards import ShardWriter
from herd.posttrain.config import DPOConfig, SFTConfig
from herd.posttrain.config import load_config as load_posttrain_config
from herd.train.config import config_from_dict
from herd.train.trainer import Trainer


def _config(tmp_path, **train):
    return {"job": {"out_dir": str(tmp_path / "out"), "device": "cpu"}, "model": {"preset": "debug"},
            "data": {"train": [str(tmp_path / "shards")]}, "train": train,
            "metrics": {"tensorboard": False, "plot": False, "progress": False},
            "stages": [{"name": "p", "steps": 1, "ramp": [[0, 64, 16]]}]}


@pytest.mark.parametrize("shard_vocab, ok", [(512, False), (256, True), (100, True)])
def test_shards_of_a_larger_vocabulary_than_the_model_are_refused_before_training(tmp_path, shard_vocab, ok):
    with ShardWriter(tmp_path / "shards", vocab_size=shard_vocab) as w:
        w.add(list(range(min(shard_vocab, 40))) * 4)
    trainer = Trainer(config_from_dict(_config(tmp_path)), log=lambda m: None)
    assert trainer.model.args.vocab_size == 256
    if ok:
        trainer.check_vocab()
    else:
        with pytest.raises(ValueError, match=r"ids up to 511.*model.vocab_size = 256"):
            trainer.fit()


@pytest.mark.parametrize("key, value", [("micro_batch_tokens", -5), ("loss_chunks", 0)])
def test_non_positive_train_sizes_are_rejected_naming_the_key(tmp_path, key, value):
    with pytest.raises(ValueError, match=f"train.{key}"):
        config_from_dict(_config(tmp_path, **{key: value}))


@pytest.mark.parametrize("section, key, value", [("metrics", "val_batches", 0), ("metrics", "val_batch_size", -1),
                                                 ("metrics", "val_every", -2)])
def test_non_positive_metric_sizes_are_rejected_naming_the_key(tmp_path, section, key, value):
    cfg = _config(tmp_path)
    cfg[section][key] = value
    with pytest.raises(ValueError, match=f"{section}.{key}"):
        config_from_dict(cfg)


@pytest.mark.parametrize("cls, override, needle", [
    (SFTConfig, "--data.seq_len=0", "data.seq_len"),
    (SFTConfig, "--optim.batch_size=0", "optim.batch_size"),
    (SFTConfig, "--output.log_every=-1", "output.log_every"),
    (DPOConfig, "--data.max_len=-3", "data.max_len"),
    (SFTConfig, "--optim.grad_clip=-1", "optim.grad_clip"),
])
def test_posttrain_sizes_are_checked_at_load(cls, override, needle):
    with pytest.raises(ValueError, match=needle):
        load_posttrain_config(cls, None, [override])
    load_posttrain_config(cls, None, [])  # the defaults pass


def test_help_lists_every_key_with_a_default_that_parses_back():
    import dataclasses
    import tomllib

    from herd.train.config import Config, StageConfig, build, describe_sections

    cfg = build(Config, {})
    listed, section = set(), None
    for line in describe_sections().splitlines():
        if not line.startswith("  "):
            section = line.strip("[]")
            continue
        key, rest = line.strip().split(" = ", 1)
        listed.add(f"{section}.{key}")
        value = rest.rsplit("  (", 1)[0]
        if section != "stages" and value != "unset":  # the printed default is TOML for the default
            assert tomllib.loads(f"v = {value}")["v"] == getattr(getattr(cfg, section), key), (section, key)
    expected = {f"stages.{g.name}" for g in dataclasses.fields(StageConfig)}
    for f in dataclasses.fields(Config):
        if f.name != "stages":
            expected |= {f"{f.name}.{g.name}" for g in dataclasses.fields(getattr(cfg, f.name))}
    assert listed == expected
