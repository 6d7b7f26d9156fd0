import json

import pytest

from herd.eval.results import EvalReport, TaskResult, atomic_write_text, format_table


def test_report_round_trips_through_json(tmp_path):
    report = EvalReport(model="runs/m", tasks=[
        TaskResult("arc-mini", {"acc": 0.5, "acc_norm": 0.625}, 8, {"num_shots": 2}),
        TaskResult("needle", {"acc": 1.0, "acc@512": 1.0}, 12, {"accuracy_grid": [[1.0], [1.0]]}),
    ], extra={"note": "é"})
    path = report.save(tmp_path / "r" / "results.json")
    loaded = EvalReport.load(path)
    assert loaded == report
    assert json.loads(path.read_text())["format"] == "herd-eval-v1"
    table = loaded.table().splitlines()
    assert table[0].split() == ["task", "metric", "value", "n"]
    assert table[2].split() == ["arc-mini", "acc", "0.5000", "8"]
    assert len(table) == 2 + 4


def test_loading_something_else_is_a_clear_error(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"tasks": []}')
    with pytest.raises(ValueError, match="not a herd eval report"):
        EvalReport.load(p)
    p.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        EvalReport.load(p)
    with pytest.raises(FileNotFoundError):
        EvalReport.load(tmp_path / "none.json")


def test_atomic_write_replaces_and_leaves_no_temporaries(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two" and [x.name for x in tmp_path.iterdir()] == ["f.txt"]


def test_table_aligns_columns():
    t = format_table(("a", "bb"), [("x", "1"), ("yyy", "22")])
    assert t.splitlines() == ["a    bb", "---  --", "x     1", "yyy  22"]
