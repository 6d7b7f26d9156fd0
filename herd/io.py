"""The bottom layer every package may import: herd's cache folder and atomic file writes.

A write goes to a temporary file in the destination's own folder and is renamed over the
destination (`os.replace`, atomic on POSIX), so a crash leaves either the old file or the
new one, never half of one, and a reader never sees a partial file. The temporary file lives
beside the destination because a rename across file systems is a copy, not atomic.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def herd_cache_dir() -> Path:
    """Where herd keeps fetched data and models: $HERD_CACHE, else $XDG_CACHE_HOME/herd, else ~/.cache/herd."""
    if os.environ.get("HERD_CACHE"):
        return Path(os.environ["HERD_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "herd"


def _umask() -> int:
    # os.umask can only be read by setting it; set it back at once (done once per process).
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


_UMASK: int | None = None


def give_default_mode(path: str | os.PathLike[str]) -> None:
    """The mode a plain open()/mkdir() would have given `path` (0666/0777 less the umask).

    tempfile's mkstemp/mkdtemp create 0600 files and 0700 folders (and so does safetensors'
    writer), and a rename keeps the mode: without this a checkpoint written atomically would be
    unreadable to other users and tools. A folder is done with everything in it; call this on the
    temporary folder once it is complete, just before renaming it into place.

    A file that has an execute bit (a script copied in on purpose: mkstemp never sets one) keeps
    it as 0777 less the umask. Symbolic links are left alone: chmod would follow them and change
    the file they point to, which may be outside the folder.
    """
    path = Path(path)
    mask = _umask()

    def mode(p: Path) -> int:
        full = p.is_dir() or os.stat(p).st_mode & 0o111
        return (0o777 if full else 0o666) & ~mask

    if path.is_dir():
        for sub in path.rglob("*"):
            if not sub.is_symlink():
                os.chmod(sub, mode(sub))
    if not path.is_symlink():
        os.chmod(path, mode(path))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` through a temporary file and a rename; creates missing parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        give_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that needs a file name rather than bytes (a
    streaming compressor, pyarrow, a child process); it is renamed over `path` when the block ends
    and removed when the block raises. The name ends in `path`'s last suffix, so writers that pick
    a compression from the suffix (.gz, .zst) still do."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:  # the writer closed it; its data must be on disk before the rename
            os.fsync(f.fileno())
        give_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_dir(dst: str | os.PathLike[str], write: Callable[[Path], None], *, overwrite: bool) -> Path:
    """Run write(tmp) on a temporary folder beside `dst`, then rename it into place.

    A reader never sees a half-written folder under dst: either the old one, nothing (for the
    instant between two renames when overwriting), or the complete new one. Without `overwrite`
    an existing file or non-empty folder at dst is a FileExistsError.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        if not dst.is_dir() or any(dst.iterdir()):
            raise FileExistsError(f"{dst} already exists; pass overwrite=True or choose another path")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        write(tmp)
        give_default_mode(tmp)  # mkdtemp and safetensors make 0700/0600; publish with the usual modes
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(dst, old)
            os.rename(tmp, dst)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_text(data: Any) -> str:
    """herd's JSON layout: two-space indent, non-ASCII kept as is, a final newline."""
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    return atomic_write_text(path, json_text(data))


def write_files(root: str | os.PathLike[str], files: Mapping[str, bytes]) -> None:
    """Write each relative path -> bytes under `root` (meant for a directory not yet renamed into place)."""
    root = Path(root)
    for rel, data in files.items():
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts:
            raise ValueError(f"file name {rel!r} must be a relative path inside the directory, without '..'")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The JSON records of a JSON-lines log that a killed process may have appended to: a missing
    file is no records, and a line that does not parse (the half-written last line of a process
    killed mid-write) is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def refuse_existing(path: str | os.PathLike[str], *, overwrite: bool) -> None:
    """Fail before any work when `path` (a file, or a directory with something in it) would be
    replaced without `overwrite`: converting or quantizing a large model first and refusing to
    save it afterwards wastes minutes. An empty directory counts as free, as the writers treat it."""
    p = Path(path)
    if overwrite or not p.exists() or (p.is_dir() and not any(p.iterdir())):
        return
    raise FileExistsError(f"{p} already exists; pass --overwrite to replace it or choose another path")
