import pytest

from herd.parallel import ParallelConfig, ParallelDims


def test_dp_shard_takes_the_remaining_ranks():
    d = ParallelDims(tp=2, pp=2, world_size=16)
    assert (d.dp_replicate, d.dp_shard, d.cp, d.tp, d.pp) == (1, 4, 1, 2, 2)
    assert d.dp == 4 and d.fsdp == 4
    assert ParallelDims(cp=2, world_size=8).fsdp == 8  # CP ranks share the FSDP shard group
    assert d.enabled == {"dp_shard": 4, "pp": 2, "tp": 2}
    assert ParallelDims().describe() == "single process"


def test_product_must_equal_world_size():
    with pytest.raises(ValueError, match=r"= 8, but the world size is 4.*torchrun --nproc-per-node 8"):
        ParallelDims(dp_shard=2, tp=2, pp=2, world_size=4)
    with pytest.raises(ValueError, match="not divisible by dp_replicate\\*cp\\*tp\\*pp = 3"):
        ParallelDims(tp=3, world_size=8)


@pytest.mark.parametrize("bad", [dict(tp=0), dict(cp=-1), dict(pp=0), dict(dp_replicate=0), dict(dp_shard=0),
                                 dict(dp_shard=-2)])
def test_degrees_must_be_positive(bad):
    with pytest.raises(ValueError, match="parallel\\."):
        ParallelDims(world_size=4, **bad)


@pytest.mark.parametrize("field, value", [("pp_schedule", "Zigzag"), ("ac", "some"), ("float8", "mx"),
                                          ("param_dtype", "fp8"), ("pp_microbatches", -1)])
def test_config_rejects_unknown_values(field, value):
    with pytest.raises(ValueError, match=field):
        ParallelConfig(**{field: value})


def test_config_builds_dims():
    assert ParallelConfig(tp=2, cp=2).dims(8) == ParallelDims(dp_shard=2, tp=2, cp=2, world_size=8)
