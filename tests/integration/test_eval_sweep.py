"""The IsoFLOP sweep on herd's trainer: each planned run is trained on C / (6 N) tokens and measured."""

import base64
import json
import random

import pytest

from herd.eval.scaling import SweepTraining, load_points, model_ladder, plan_isoflop_sweep, run_sweep, trainer_train_fn

pytest.importorskip("herd.train")
from herd.data.shards import ShardWriter  # noqa: E402

WORDS = "the llama eats grass and hay while the alpaca sleeps near a cold river in the green valley".split()


def shards(path, *, docs, seed):
    rng = random.Random(seed)
    with ShardWriter(path, vocab_size=512, bos=256, eos=257) as w:
        for _ in range(docs):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) + "."
            w.add([256, *text.encode(), 257])
    return str(path)


def test_sweep_trains_each_run_on_its_token_budget_and_scores_the_task(tmp_path):
    tok = tmp_path / "tokenizer.model"
    tok.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps({"question": f"What does the llama eat {i}?",
                                          "choices": ["grass", "rocks"], "answer": 0}) for i in range(3)) + "\n")
    settings = SweepTraining(train=(shards(tmp_path / "train", docs=300, seed=0),),
                             val=(shards(tmp_path / "val", docs=30, seed=1),), tokenizer=str(tok), seq_len=64,
                             batch_tokens=512, lr=3e-3, val_batches=1, task=str(task))
    ladder = model_ladder(vocab_size=512, max_seq_len=64, depths=(1, 2, 3))
    plan = plan_isoflop_sweep([6e8], ladder, points_per_budget=3, tokens_per_param=0.05)  # 1 to 7 steps
    assert [r.args.n_layers for r in plan] == [1, 2, 3]
    points = run_sweep(plan, trainer_train_fn(settings, log=lambda m: None), out_dir=tmp_path / "sweep")
    assert load_points(tmp_path / "sweep" / "points.jsonl") == points
    for run, p in zip(plan, points):
        steps = max(1, round(run.tokens / 512))
        assert p.tokens == steps * 512  # C / (6 N) rounded to whole batches
        assert 0 < p.loss < 7.0  # below uniform over 512 tokens (ln 512 = 6.24) after any training at all
        assert p.task_nll > 0 and 0 <= p.task_acc <= 1
        assert (tmp_path / "sweep" / run.name / "checkpoints").is_dir()
    # A run trained earlier (e.g. the held-out check of a rerun sweep) is measured, not retrained.
    again = trainer_train_fn(settings, log=lambda m: None)(plan[0], out_dir=tmp_path / "sweep" / plan[0].name)
    assert again.loss == pytest.approx(points[0].loss, abs=1e-6) and again.tokens == points[0].tokens


def test_sweep_cli_aspect_ratio_sets_the_ladder_width_and_is_validated(tmp_path, capsys):
    from herd.cli import main
    from herd.eval.scaling import shape_for_depth

    # width = aspect x depth rounded to whole 16-wide heads: depth 3 at aspect 16 is 48 wide.
    assert shape_for_depth(3, vocab_size=512, max_seq_len=64, aspect_ratio=16).dim == 48
    args = ["scaling", "sweep", "--train", "x", "--val", "y", "--vocab-size", "512", "--budgets", "1e9",
            "--out", str(tmp_path / "s")]
    assert main(args + ["--aspect-ratio", "0"]) == 2
    assert "--aspect-ratio must be >= 1" in capsys.readouterr().err
