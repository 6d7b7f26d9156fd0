"""Real web-like pages from Debian packages, fetched without installing anything.

`apt-get download` fetches the .deb (no dependencies resolved, no maintainer scripts run) and
`dpkg -x` unpacks it into a cache folder, so the demo needs neither root nor a changed system.
Metapackages such as `python3-doc` carry no files; their direct dependencies are fetched too.
A `.done` marker written last makes a half-unpacked cache visible as such and redone. This is
herd's one Debian cache: the pipeline's `debian` reader and `herd.data.corpora` (Jane Austen's
novels) both fetch through `fetch_packages`, by default into `herd_cache_dir() / "debian"`.

`write_warc` stores documents as WARC response records (warcio), the format a crawler leaves,
so the pipeline's WARC reader is exercised on real pages with their real URLs.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path

from herd.data.document import Document
from herd.io import atomic_path, atomic_write_text, herd_cache_dir


def debian_cache_dir() -> Path:
    """The default cache of `fetch_packages`: `herd_cache_dir() / "debian"`."""
    return herd_cache_dir() / "debian"


def _run(cmd: list[str], *, cwd: Path | None = None) -> str:
    if shutil.which(cmd[0]) is None:
        raise FileNotFoundError(f"`{cmd[0]}` is not on PATH: the Debian demo data needs a Debian/Ubuntu system "
                                "with apt-get and dpkg; point a folder/warc/jsonl reader at your own files instead")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        hint = " (run `apt-get update` once so apt knows the package)" if cmd[0].startswith("apt") else ""
        raise FileNotFoundError(f"`{' '.join(cmd)}` failed{hint}: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def _depends(deb: Path) -> list[str]:
    out = _run(["dpkg-deb", "-f", str(deb), "Depends"]).strip()
    names = []
    for item in filter(None, (s.strip() for s in out.split(","))):
        first = item.split("|")[0].strip()  # of alternatives, the first is what apt would pick
        names.append(first.split()[0].split(":")[0])
    return names


def fetch_packages(packages: list[str], *, cache_dir: Path | None = None) -> Path:
    """Downloads and unpacks `packages` (and, for packages with no files of their own, their direct
    dependencies) into `cache_dir/root` (default `debian_cache_dir()`); returns that root. Reuses a
    finished cache."""
    if not packages:
        raise ValueError("a debian reader needs `packages = [...]` (e.g. [\"debian-handbook\"])")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else debian_cache_dir()
    root = cache_dir / "root"
    debs = cache_dir / "debs"
    todo = [p for p in packages if not (cache_dir / f"{p}.done").exists()]
    for pkg in todo:
        debs.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=debs) as tmp:
            _run(["apt-get", "download", pkg], cwd=Path(tmp))
            [deb] = list(Path(tmp).glob("*.deb"))
            names = [pkg]
            files = _run(["dpkg-deb", "-c", str(deb)])
            if "/usr/share/doc/" in files and files.count("\n") < 20:  # metapackage: only changelog/copyright
                names += [d for d in _depends(deb) if d not in packages]
                for dep in names[1:]:
                    _run(["apt-get", "download", dep], cwd=Path(tmp))
            root.mkdir(parents=True, exist_ok=True)
            for d in sorted(Path(tmp).glob("*.deb")):
                _run(["dpkg", "-x", str(d), str(root)])
        (cache_dir / f"{pkg}.done").write_text("\n".join(names) + "\n")
    return root


def write_warc(docs: Iterable[Document], path: Path, *, source_files: list[str] | None = None) -> Path:
    """Writes documents as HTTP 200 text/html response records (atomically); skips the work when
    `path` exists and was written from the same `source_files` list."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    listing = path.with_suffix(".files")
    wanted = "\n".join(source_files or [])
    if path.exists() and listing.exists() and listing.read_text() == wanted:
        return path
    listing.unlink(missing_ok=True)  # a crash while rewriting must not leave the old listing vouching for it
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        w = WARCWriter(f, gzip=True)
        for doc in docs:
            assert doc.url, f"{doc.id}: a WARC record needs a URL"
            payload = doc.text.encode("utf-8")
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                                  ("Content-Length", str(len(payload)))], protocol="HTTP/1.1")
            # A record id derived from what the record holds (warcio's default is a random uuid), so
            # rewriting the same pages gives the same ids, and steps that sample by id (the mix)
            # choose the same pages in every fresh run.
            key = f"{doc.url}\n{doc.timestamp or ''}\n{hashlib.sha256(payload).hexdigest()}"
            warc_headers = {"WARC-Record-ID": f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, key)}>"}
            if doc.timestamp:
                warc_headers["WARC-Date"] = doc.timestamp
            rec = w.create_warc_record(doc.url, "response", payload=io.BytesIO(payload), http_headers=headers,
                                       warc_headers_dict=warc_headers)
            w.write_record(rec)
    # The listing goes last: it is what says that `path` is complete for these source files.
    atomic_write_text(listing, wanted)
    return path
