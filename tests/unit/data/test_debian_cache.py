"""herd has one Debian cache: Jane Austen's package (herd.data.corpora) and the pipeline's `debian`
reader both fetch through herd.data.debian.fetch_packages. Checked with stand-in `apt-get`,
`dpkg-deb` and `dpkg` scripts that log every download, so no network or apt lists are needed."""

import tarfile
from pathlib import Path

import pytest

from herd.data.corpora import AUSTEN_DATA_SUBDIR, AUSTEN_DEB, austen_data_dir, fetch_austen
from herd.data.debian import debian_cache_dir, fetch_packages, herd_cache_dir
from herd.data.steps.readers import DebianReader


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    """A package "repository" of tar files and tools that serve it; returns the download log."""
    repo, bin_dir, log = tmp_path / "repo", tmp_path / "bin", tmp_path / "downloads.log"
    repo.mkdir()
    bin_dir.mkdir()
    payload = tmp_path / "payload"
    (payload / AUSTEN_DATA_SUBDIR).mkdir(parents=True)
    (payload / AUSTEN_DATA_SUBDIR / "Rdata.rdb").write_bytes(b"planted")
    with tarfile.open(repo / f"{AUSTEN_DEB}.deb", "w") as tar:
        tar.add(payload / "usr", arcname="usr")
    scripts = {
        "apt-get": f'[ "$1" = download ] || exit 2\necho "$2" >> {log}\ncp {repo}/"$2".deb ./"$2"_1.0_all.deb',
        # A listing longer than a metapackage's, so no dependencies are fetched.
        "dpkg-deb": 'for i in $(seq 30); do echo "-rw-r--r-- root/root ./usr/lib/file$i"; done',
        "dpkg": '[ "$1" = -x ] || exit 2\nmkdir -p "$3" && tar -xf "$2" -C "$3"',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return log


def test_austen_is_fetched_once_into_the_shared_debian_cache(tmp_path, fake_apt, monkeypatch):
    cache = tmp_path / "cache"
    data = fetch_austen(cache_dir=cache)
    assert data == cache / "debian" / "root" / AUSTEN_DATA_SUBDIR
    assert (data / "Rdata.rdb").read_bytes() == b"planted"
    assert (cache / "debian" / f"{AUSTEN_DEB}.done").is_file()  # fetch_packages' marker
    assert fetch_austen(cache_dir=cache) == data
    # The pipeline's reader of the same cache finds the package already there.
    assert fetch_packages([AUSTEN_DEB], cache_dir=cache / "debian") == cache / "debian" / "root"
    monkeypatch.setenv("HERD_CACHE", str(cache))
    reader = DebianReader(packages=[AUSTEN_DEB], root=AUSTEN_DATA_SUBDIR, glob="*.rdb", format="text")
    assert reader.units() == [str(data / "Rdata.rdb")]
    assert fake_apt.read_text().split() == [AUSTEN_DEB]  # one download for all four
    if not (Path("/") / AUSTEN_DATA_SUBDIR / "Rdata.rdb").is_file():  # an R installation's copy comes first
        assert austen_data_dir(fetch=False, cache_dir=cache) == data

def test_cache_locations_follow_herd_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HERD_CACHE", str(tmp_path / "c"))
    assert herd_cache_dir() == tmp_path / "c"
    assert debian_cache_dir() == tmp_path / "c" / "debian"
    monkeypatch.delenv("HERD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert debian_cache_dir() == tmp_path / "x" / "herd" / "debian"


def test_warc_record_ids_depend_only_on_the_record(tmp_path):
    from herd.data.debian import write_warc
    from herd.data.document import Document
    from herd.data.steps.readers import WarcReader

    pages = [Document(id="1", text="<p>one</p>", url="https://ex.org/1", timestamp="2024-01-01T00:00:00Z"),
             Document(id="2", text="<p>two</p>", url="https://ex.org/2"),
             Document(id="3", text="<p>one, again</p>", url="https://ex.org/1", timestamp="2024-01-01T00:00:00Z")]

    def ids(path):
        write_warc(pages, path)
        return [d.id for d in WarcReader(paths=[str(path)]).read(str(path))]

    first = ids(tmp_path / "a.warc.gz")
    assert first == ids(tmp_path / "b.warc.gz") and len(set(first)) == 3
    assert all(i.startswith("urn:uuid:") for i in first)
