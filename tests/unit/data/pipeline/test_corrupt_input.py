"""Damaged inputs: each kind is skipped and counted by default (the good records around it still
come out) and stops the run with the file, the place and the problem under `strict = true`.
Every input is generated here, and every expected count is worked out by hand from how it was cut."""

import gzip
import io
import json

import pytest

from herd.cli import main
from herd.data.steps.readers import JsonlReader, WarcReader

N_PAGES = 10


def warc_bytes(*, gz=True):
    """A WARC of N_PAGES HTML responses and the byte offset where each record starts."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buf, offsets = io.BytesIO(), []
    w = WARCWriter(buf, gzip=gz)
    for i in range(N_PAGES):
        offsets.append(buf.tell())
        body = f"<html><body><p>page {i} {'word ' * 100}</p></body></html>".encode()
        headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
        w.write_record(w.create_warc_record(f"https://x.org/{i}", "response", payload=io.BytesIO(body),
                                            http_headers=headers))
    return buf.getvalue(), offsets


def read_all(reader, path):
    skipped = []
    docs = list(reader.read(str(path), skipped.append))
    return [d.url.rsplit("/", 1)[1] if d.url else d.text for d in docs], skipped


def pages(*idx):
    return [str(i) for i in idx]


# ---- WARC ---------------------------------------------------------------------------------------


def test_truncated_warc_gz_keeps_the_records_before_the_cut_and_reports_it(tmp_path):
    data, offs = warc_bytes()
    path = tmp_path / "cut.warc.gz"
    path.write_bytes(data[: offs[6] + 40])  # 40 bytes into record 6's gzip member
    got, skipped = read_all(WarcReader(), path)
    assert got == pages(0, 1, 2, 3, 4, 5)
    assert len(skipped) == 1 and skipped[0].where == f"byte {offs[6]}" and "cut short" in skipped[0].problem
    with pytest.raises(ValueError, match=rf"cut\.warc\.gz, byte {offs[6]}: the file is cut short"):
        list(WarcReader(strict=True).read(str(path), skipped.append))


def test_truncated_plain_warc_is_reported_with_the_short_record(tmp_path):
    data, offs = warc_bytes(gz=False)
    path = tmp_path / "cut.warc"
    path.write_bytes(data[: offs[3] + 500])
    got, skipped = read_all(WarcReader(), path)
    assert got == pages(0, 1, 2) and [c.where for c in skipped] == [f"byte {offs[3]}"]


def test_corrupt_gzip_member_is_skipped_and_the_rest_read(tmp_path):
    data, offs = warc_bytes()
    bad = bytearray(data)
    bad[offs[4] + 20: offs[4] + 60] = b"x" * 40  # inside record 4's deflate data
    path = tmp_path / "corrupt.warc.gz"
    path.write_bytes(bytes(bad))
    got, skipped = read_all(WarcReader(), path)
    assert got == pages(0, 1, 2, 3, 5, 6, 7, 8, 9)
    assert [c.where for c in skipped] == [f"byte {offs[4]}"] and "unreadable WARC record" in skipped[0].problem
    with pytest.raises(ValueError, match=rf"corrupt\.warc\.gz, byte {offs[4]}: unreadable WARC record"):
        list(WarcReader(strict=True).read(str(path), skipped.append))


def test_invalid_warc_header_is_skipped_and_the_rest_read(tmp_path):
    data, offs = warc_bytes()
    member = gzip.compress(b"NOT-A-WARC 1.0\r\nfoo: bar\r\n\r\n")
    path = tmp_path / "header.warc.gz"
    path.write_bytes(data[: offs[2]] + member + data[offs[2]:])  # a bad record between pages 1 and 2
    got, skipped = read_all(WarcReader(), path)
    assert got == pages(*range(N_PAGES))
    assert [c.where for c in skipped] == [f"byte {offs[2]}"] and "Invalid WARC header" in skipped[0].problem
    with pytest.raises(ValueError, match=rf"header\.warc\.gz, byte {offs[2]}: .*Invalid WARC header"):
        list(WarcReader(strict=True).read(str(path), skipped.append))


def test_a_whole_warc_reports_nothing(tmp_path):
    for gz in (True, False):
        path = tmp_path / f"ok.warc{'.gz' if gz else ''}"
        path.write_bytes(warc_bytes(gz=gz)[0])
        assert read_all(WarcReader(), path) == (pages(*range(N_PAGES)), [])


def test_a_single_stream_warc_gz_cut_short_is_reported(tmp_path):
    # Some tools gzip a whole WARC as one stream: no record offsets, but the cut is still noticed.
    data, _ = warc_bytes(gz=False)
    path = tmp_path / "one.warc.gz"
    path.write_bytes(gzip.compress(data)[:-50])
    got, skipped = read_all(WarcReader(), path)
    assert len(got) < N_PAGES and [c.where for c in skipped] == ["end of file"]


# ---- JSONL --------------------------------------------------------------------------------------


GOOD = [json.dumps({"text": f"doc {i}"}).encode() for i in range(4)]


def jsonl_with(tmp_path, bad: bytes, name="x.jsonl"):
    """good 0, good 1, the bad line (line 3), good 2, good 3."""
    path = tmp_path / name
    path.write_bytes(b"\n".join([GOOD[0], GOOD[1], bad, GOOD[2], GOOD[3]]) + b"\n")
    return path


@pytest.mark.parametrize("bad, problem", [
    (b'{"text": 5}', "'text' is a int, not a string"),
    (b'{"text": "unterminated', "invalid JSON"),
    (b'{"text": "caf\xe9"}', "not UTF-8 (byte 0xe9"),
    (b'[1, 2]', "a JSON list, not an object"),
])
def test_bad_jsonl_line_is_skipped_with_its_line_number(tmp_path, bad, problem):
    path = jsonl_with(tmp_path, bad)
    got, skipped = read_all(JsonlReader(), path)
    assert got == ["doc 0", "doc 1", "doc 2", "doc 3"]
    assert len(skipped) == 1 and skipped[0].where == "line 3" and problem in skipped[0].problem
    with pytest.raises(ValueError, match=r"x\.jsonl, line 3: ") as e:
        list(JsonlReader(strict=True).read(str(path), skipped.append))
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_a_wrong_text_key_is_a_config_error_not_a_file_of_corrupt_lines(tmp_path):
    # One line without the field is damage; a file where no line has it means text_key is wrong.
    path = tmp_path / "other.jsonl"
    path.write_text('{"content": "a"}\n{"content": "b"}\n')
    skipped = []
    with pytest.raises(ValueError, match=r"none of its 2 JSON objects has a 'text' field; set text_key"):
        list(JsonlReader().read(str(path), skipped.append))
    assert [d.text for d in JsonlReader(text_key="content").read(str(path), skipped.append)] == ["a", "b"]


def test_truncated_jsonl_gz_keeps_the_lines_before_the_cut(tmp_path):
    lines = [json.dumps({"text": f"doc {i} " + "padding " * 50}) for i in range(200)]
    whole = gzip.compress("\n".join(lines).encode() + b"\n")
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    got, skipped = read_all(JsonlReader(), path)
    assert 0 < len(got) < 200 and got == [json.loads(x)["text"] for x in lines[: len(got)]]
    assert len(skipped) == 1 and "truncated" in skipped[0].problem
    # Where it stops is after the last whole line read (a cut last line is not passed on as JSON).
    assert skipped[0].where in (f"after line {len(got)}", f"line {len(got) + 1}")


def test_not_gzip_at_all_is_one_corrupt_file(tmp_path):
    path = tmp_path / "junk.jsonl.gz"
    path.write_bytes(b"this is not gzip data\n" * 10)
    got, skipped = read_all(JsonlReader(), path)
    assert got == [] and [c.where for c in skipped] == ["after line 0"] and "corrupt" in skipped[0].problem


def test_truncated_jsonl_zst_is_noticed(tmp_path):
    import zstandard

    lines = [json.dumps({"text": f"doc {i} " + "padding " * 50}) for i in range(200)]
    whole = zstandard.ZstdCompressor().compress("\n".join(lines).encode() + b"\n")
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(whole[: len(whole) // 2])
    got, skipped = read_all(JsonlReader(), path)
    assert len(skipped) == 1 and "truncated" in skipped[0].problem
    assert got == [json.loads(x)["text"] for x in lines[: len(got)]]


# ---- through the pipeline and the CLI -----------------------------------------------------------


def write_pipeline(tmp_path, *, strict):
    inp = tmp_path / "in"
    inp.mkdir()
    jsonl_with(inp, b'{"text": 5}', name="a.jsonl")
    data, offs = warc_bytes()
    (inp / "b.warc.gz").write_bytes(data[: offs[6] + 40])
    toml = tmp_path / "p.toml"
    toml.write_text(f"""
[pipeline]
output_dir = "{tmp_path / 'run'}"

[[input]]
type = "jsonl"
paths = ["{inp / 'a.jsonl'}"]
strict = {str(strict).lower()}

[[input]]
type = "warc"
paths = ["{inp / 'b.warc.gz'}"]

[[output]]
type = "jsonl"
path = "out.jsonl"
""")
    return toml, offs


def test_pipeline_run_counts_skipped_records_in_report_json(tmp_path, capsys):
    toml, offs = write_pipeline(tmp_path, strict=False)
    assert main(["data", "run", str(toml)]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["skipped_corrupt"] == 2
    [read] = [s for s in report["steps"] if s["type"] == "read"]
    assert read["skipped_corrupt"] == 2 and read["docs_out"] == 4 + 6
    where = sorted((e["file"].rsplit("/", 1)[1], e["where"]) for e in report["corrupt_examples"])
    assert where == [("a.jsonl", "line 3"), ("b.warc.gz", f"byte {offs[6]}")]
    assert "skipped 2 corrupt record(s)" in capsys.readouterr().err
    assert len((tmp_path / "run" / "out.jsonl").read_text().splitlines()) == 10


def test_pipeline_strict_input_stops_with_one_line(tmp_path, capsys):
    toml, _ = write_pipeline(tmp_path, strict=True)
    assert main(["data", "run", str(toml)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "a.jsonl, line 3: 'text' is a int, not a string" in err


def test_parquet_bad_row_and_unreadable_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from herd.data.steps.readers import ParquetReader

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), path)  # row 2 has no text (null)
    got, skipped = read_all(ParquetReader(), path)
    assert got == ["a", "c"] and [c.where for c in skipped] == ["row 2"]
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    got, skipped = read_all(ParquetReader(), junk)
    assert got == [] and [c.where for c in skipped] == ["row 0"] and "Parquet" in skipped[0].problem
    with pytest.raises(ValueError, match=r"junk\.parquet, row 0: not a readable Parquet file"):
        list(ParquetReader(strict=True).read(str(junk), skipped.append))
