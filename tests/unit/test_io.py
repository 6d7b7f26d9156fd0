"""herd.io: atomic writes leave nothing half-written, and published files get the usual modes."""

import os
import stat
import tempfile

import pytest

from herd.io import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_json, give_default_mode, write_files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_gets_the_mode_open_would_give(tmp_path):
    path = atomic_write_bytes(tmp_path / "a" / "b.bin", b"xyz")
    assert path.read_bytes() == b"xyz"
    assert _mode(path) == 0o666 & ~_umask()  # not mkstemp's 0600
    assert [p.name for p in path.parent.iterdir()] == ["b.bin"]  # no temporary file left


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = atomic_write_json(tmp_path / "c.json", {"v": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"v": 2})
    assert path.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_give_default_mode_covers_a_whole_temporary_folder(tmp_path):
    folder = tempfile.mkdtemp(dir=tmp_path)  # 0700
    write_files(folder, {"x.json": b"{}", "sub/y.bin": b"1"})
    fd, private = tempfile.mkstemp(dir=folder)  # 0600, as safetensors writes
    os.close(fd)
    give_default_mode(folder)
    mask = _umask()
    assert _mode(folder) == 0o777 & ~mask
    assert _mode(os.path.join(folder, "sub")) == 0o777 & ~mask
    for f in ("x.json", "sub/y.bin", private):
        assert _mode(os.path.join(folder, f)) == 0o666 & ~mask


def test_give_default_mode_keeps_execute_bits_and_leaves_links_alone(tmp_path):
    # A script copied into a checkpoint stays runnable, and a link to a file outside the folder
    # does not get that file's mode changed through it.
    outside = tmp_path / "outside.txt"
    outside.write_text("shared")
    os.chmod(outside, 0o600)
    folder = tempfile.mkdtemp(dir=tmp_path)
    script = os.path.join(folder, "run.sh")
    with open(script, "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(script, 0o700)
    os.symlink(outside, os.path.join(folder, "link.txt"))
    give_default_mode(folder)
    mask = _umask()
    assert _mode(script) == 0o777 & ~mask
    assert _mode(outside) == 0o600


def test_write_files_refuses_paths_outside_the_folder(tmp_path):
    with pytest.raises(ValueError):
        write_files(tmp_path, {"../escape.txt": b"no"})


def test_atomic_path_publishes_on_success_and_leaves_nothing_on_error(tmp_path):
    dest = tmp_path / "sub" / "docs.jsonl.gz"
    with atomic_path(dest) as tmp:
        # The writer sees a temporary name in the same folder that keeps the compression suffix.
        assert tmp.parent == dest.parent and tmp.name.endswith(".gz") and not dest.exists()
        tmp.write_bytes(b"new")
    assert dest.read_bytes() == b"new" and sorted(p.name for p in dest.parent.iterdir()) == ["docs.jsonl.gz"]
    assert dest.stat().st_mode & 0o777 == 0o666 & ~_umask()
    try:
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer crashed")
    except RuntimeError:
        pass
    assert dest.read_bytes() == b"new" and sorted(p.name for p in dest.parent.iterdir()) == ["docs.jsonl.gz"]


def test_atomic_path_replaces_only_when_the_writer_succeeds(tmp_path):
    path = tmp_path / "deep" / "m.gguf"
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent and not path.exists()  # beside it, not yet in place
        tmp.write_bytes(b"v1")  # a writer that opens the name itself
    assert path.read_bytes() == b"v1" and _mode(path) == 0o666 & ~_umask()
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert path.read_bytes() == b"v1"
    assert [p.name for p in path.parent.iterdir()] == ["m.gguf"]  # the temporary file is gone


def test_atomic_dir_replaces_whole_folders_or_nothing(tmp_path):
    dst = tmp_path / "ckpt"
    atomic_dir(dst, lambda d: write_files(d, {"a.json": b"1", "sub/b.bin": b"2"}), overwrite=False)
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*")) == ["a.json", "sub", "sub/b.bin"]
    assert _mode(dst) == 0o777 & ~_umask()  # not mkdtemp's 0700
    with pytest.raises(FileExistsError, match="already exists"):
        atomic_dir(dst, lambda d: None, overwrite=False)

    def half(d):
        write_files(d, {"a.json": b"new"})
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_dir(dst, half, overwrite=True)
    assert (dst / "a.json").read_bytes() == b"1"  # the old folder is intact
    atomic_dir(dst, lambda d: write_files(d, {"c.txt": b"3"}), overwrite=True)
    assert [p.name for p in dst.iterdir()] == ["c.txt"]  # replaced, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary or old folder left


def test_read_records_leaves_out_a_half_written_last_line(tmp_path):
    from herd.io import read_records

    log = tmp_path / "events.jsonl"
    assert read_records(log) == []  # no file yet: no records
    log.write_text('{"step": 1}\n{"step": 2, "loss": 3.5}\n{"step": 3, "lo')  # killed mid-write
    assert read_records(log) == [{"step": 1}, {"step": 2, "loss": 3.5}]
