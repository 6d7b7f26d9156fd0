"""`herd train`'s launcher flags: --nproc and --max-restarts come out of the override list, with
errors that name the flag; and how many restarts a run gets."""

from pathlib import Path

import pytest

from herd.parallel.launch import pop_max_restarts, pop_nproc
from herd.train.elastic import DEFAULT_RESTARTS, restarts_for


def test_flags_come_out_of_the_overrides():
    args = ["--optim.lr", "1e-3", "--nproc", "2", "--max-restarts=5", "--job.seed", "3"]
    nproc, rest = pop_nproc(args)
    restarts, rest = pop_max_restarts(rest)
    assert (nproc, restarts, rest) == (2, 5, ["--optim.lr", "1e-3", "--job.seed", "3"])
    assert pop_max_restarts(["--max-restarts", "0"]) == (0, [])
    assert pop_max_restarts(["--x", "1"]) == (None, ["--x", "1"])
    assert pop_nproc([]) == (1, [])


@pytest.mark.parametrize("args, message", [
    (["--max-restarts", "-1"], "--max-restarts needs a number"),
    (["--max-restarts"], "--max-restarts needs a number"),
    (["--max-restarts", "three"], "got 'three'"),
])
def test_bad_max_restarts(args, message):
    with pytest.raises(ValueError, match=message):
        pop_max_restarts(args)


def test_nproc_must_be_positive():
    with pytest.raises(ValueError, match="--nproc needs a positive number"):
        pop_nproc(["--nproc", "0"])


def test_restarts_default_to_three_under_torchrun_and_none_in_one_process():
    assert restarts_for(2, None) == DEFAULT_RESTARTS == 3
    assert restarts_for(1, None) == 0
    assert restarts_for(2, 0) == 0 and restarts_for(1, 2) == 2


def test_cli_bad_max_restarts_exits_2_with_the_reason(capsys):
    from herd.cli import main

    config = Path(__file__).resolve().parents[3] / "configs" / "debug.toml"
    assert main(["train", str(config), "--nproc", "2", "--max-restarts", "many"]) == 2
    assert "--max-restarts needs a number (0 or more), got 'many'" in capsys.readouterr().err
