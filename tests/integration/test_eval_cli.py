"""`herd eval mc|needle|lm-eval` and `herd scaling fit` on a tiny checkpoint, checked against the library."""

import base64
import importlib.util
import json
import math

import numpy as np
import pytest

import herd
from herd.cli import main
from herd.eval.multiple_choice import evaluate_mc, load_mc_jsonl
from herd.eval.needle import evaluate_needle
from herd.eval.scaling import SweepPoint, save_points
from herd.model import ModelArgs, build_model
from herd.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random model over a byte-level vocabulary, saved with its tokenizer.model beside the weights."""
    path = tmp_path_factory.mktemp("eval") / "hf"
    model = build_model(ModelArgs.from_name("debug").replace(vocab_size=512, max_seq_len=512), seed=4).eval()
    herd.save_model(model, path, format="hf")
    (path / "tokenizer.model").write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return path, model, Tokenizer.from_file(path / "tokenizer.model")


def test_eval_mc_reports_the_library_accuracy(ckpt, tmp_path, capsys):
    path, model, tok = ckpt
    task = tmp_path / "llamas.jsonl"
    task.write_text("\n".join(json.dumps(x) for x in [
        {"question": "What do llamas eat?", "choices": ["grass", "fish", "rocks"], "answer": 0},
        {"question": "Where are llamas from?", "choices": ["the Andes", "the Alps"], "answer": 0},
        {"question": "Sky colour?", "choices": ["green", "blue"], "answer": 1},
    ]) + "\n")
    out = tmp_path / "results.json"
    assert main(["eval", "mc", str(path), "--task", str(task), "--shots", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    expected = evaluate_mc(model, tok, load_mc_jsonl(task), task="llamas", num_shots=1)
    report = json.loads(out.read_text())
    [t] = report["tasks"]
    assert t["task"] == "llamas" and t["num_examples"] == 3
    assert t["metrics"] == {"acc": expected.accuracy, "acc_norm": expected.accuracy_norm,
                            "answer_nll": pytest.approx(expected.answer_nll)}
    assert "acc_norm" in printed and "results written to" in printed


def test_eval_mc_malformed_task_is_a_one_line_error(ckpt, tmp_path, capsys):
    task = tmp_path / "bad.jsonl"
    task.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q"}\n')
    assert main(["eval", "mc", str(ckpt[0]), "--task", str(task)]) == 2
    assert "bad.jsonl:2: missing field" in capsys.readouterr().err


def test_eval_needle_writes_grid_heatmap_and_json(ckpt, tmp_path, capsys):
    path, model, tok = ckpt
    heat, out = tmp_path / "needle.png", tmp_path / "needle.json"
    assert main(["eval", "needle", str(path), "--lengths", "120,200", "--depths", "0,1", "--trials", "2",
                 "--heatmap", str(heat), "--out", str(out)]) == 0
    expected = evaluate_needle(model, tok, lengths=[120, 200], depths=[0.0, 1.0], trials=2)
    [t] = json.loads(out.read_text())["tasks"]
    assert t["config"]["accuracy_grid"] == expected.accuracy
    assert heat.read_bytes()[:4] == b"\x89PNG"
    assert "mean accuracy" in capsys.readouterr().out
    assert main(["eval", "needle", str(path), "--lengths", "1000", "--depths", "0.5"]) == 2  # beyond max_seq_len


def test_eval_lm_eval_without_the_harness_says_how_to_install(ckpt):
    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval is installed here; this checks the message shown without it")
    with pytest.raises(ImportError, match=r"herd\[lm-eval\]"):
        main(["eval", "lm-eval", str(ckpt[0]), "--tasks", "hellaswag"])


def test_scaling_fit_prints_fits_and_writes_plots(tmp_path, capsys):
    rng = np.random.default_rng(0)
    points = []
    for c in np.geomspace(1e12, 1e15, 4):
        n_opt = 0.29 * c**0.53
        for r in np.linspace(-1, 1, 5):
            n = n_opt * math.exp(r)
            points.append(SweepPoint(name=f"{c:.0e}{r:+.1f}", budget=float(c), n_params=int(n),
                                     loss=2 + 20 * c**-0.1 + 0.1 * r * r + rng.normal(0, 0.001)))
    save_points(points, tmp_path / "points.jsonl")
    out = tmp_path / "fit.json"
    assert main(["scaling", "fit", str(tmp_path / "points.jsonl"), "--predict", "1e16", "--plot-dir",
                 str(tmp_path / "plots"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    fit = json.loads(out.read_text())
    assert fit["n_opt"]["alpha"] == pytest.approx(0.53, abs=0.01)
    assert fit["prediction"]["n_opt"] == pytest.approx(0.29 * 1e16**0.53, rel=0.1)
    assert "N*(C) = " in printed and "prediction at C = 1e+16" in printed
    assert (tmp_path / "plots" / "isoflops.png").read_bytes()[:4] == b"\x89PNG"
