"""HTML -> plain text, with a per-document time limit, image alt text kept and markdown removed.

Trade-off: the extractor runs in a child process that the step talks to over a pipe. Both
backends spend their time in C/C++ (resiliparse's lexbor, trafilatura's lxml), where neither a
signal nor a thread can interrupt them, so a pathological page can only be stopped by killing the
process that parses it (datatrove does the same). The pipe costs ~50 us per page against ~2.5 ms
of resiliparse parsing; `timeout_s = 0` turns the sandbox off for trusted input.

Llama 3 keeps `alt` text (maths often lives there as LaTeX) and removes every markdown marker
(markdown hurt a web-trained model); both are defaults here. resiliparse (~15x faster than
trafilatura here, see the research note) is the default; trafilatura is the precision option.
"""

from __future__ import annotations

import multiprocessing as mp
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from herd.data.document import Document
from herd.data.steps.base import Step, StepStats

# ---- markdown markers --------------------------------------------------------------------------

_MD_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^[ \t]{0,3}(`{3,}|~{3,}).*$", re.M), ""),                        # code fences (content kept)
    (re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+(.*?)[ \t]*#*[ \t]*$", re.M), r"\1"),     # ATX headings
    (re.compile(r"^[ \t]{0,3}(=+|-+)[ \t]*$", re.M), ""),                          # setext underlines, rules
    (re.compile(r"^[ \t]{0,3}([*_][ \t]*){3,}$", re.M), ""),                       # *** / ___ rules
    (re.compile(r"^([ \t]*)>[ \t]?", re.M), r"\1"),                                # block quotes
    (re.compile(r"^([ \t]*)[*+-][ \t]+(?=\S)", re.M), r"\1"),                      # bullet markers
    (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),                                # images -> alt text
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),                                 # links -> link text
    (re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1"), r"\2"),                         # bold
    (re.compile(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])"), r"\1"),        # *italic*
    (re.compile(r"(?<![\w_])_(?=\S)([^_\n]+?)(?<=\S)_(?![\w_])"), r"\1"),          # _italic_ (not snake_case)
    (re.compile(r"`([^`\n]+)`"), r"\1"),                                           # inline code
    (re.compile(r"^[ \t]*\|?([ \t]*:?-{3,}:?[ \t]*\|)+[ \t]*:?-*:?[ \t]*$", re.M), ""),  # table separator rows
]


def strip_markdown(text: str) -> str:
    """Removes markdown markers and keeps their content (link text, image alt text, code)."""
    for pattern, repl in _MD_RULES:
        text = pattern.sub(repl, text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ---- backends ----------------------------------------------------------------------------------


def extract_html(html: str, *, backend: str = "resiliparse", main_content: bool = True,
                 alt_texts: bool = True) -> str:
    if backend == "resiliparse":
        from resiliparse.extract.html2text import extract_plain_text

        return extract_plain_text(html, preserve_formatting=True, main_content=main_content, alt_texts=alt_texts,
                                  links=False, list_bullets=False)
    if backend == "trafilatura":
        import trafilatura

        # include_images keeps <img> as markdown `![alt](src)`, which strip_markdown turns into the alt.
        out = trafilatura.extract(html, favor_precision=True, include_images=alt_texts, include_comments=False,
                                  include_tables=True, deduplicate=False, no_fallback=not main_content)
        return out or ""
    raise ValueError(f"unknown extraction backend {backend!r}; use 'resiliparse' or 'trafilatura'")


def _sandbox_loop(conn: Any, fn: Callable[[str], str]) -> None:
    while True:
        html = conn.recv()
        if html is None:
            return
        try:
            conn.send(("ok", fn(html)))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which drops the page with the reason
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _Sandbox:
    """A child process that runs `fn`; killed and restarted when a call exceeds the limit."""

    def __init__(self, fn: Callable[[str], str], timeout_s: float) -> None:
        self.fn, self.timeout_s = fn, timeout_s
        self.proc: Any = None
        self.conn: Any = None

    def _start(self) -> None:
        ctx = mp.get_context("fork")  # the step's objects (and any test extractor) need no pickling
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_sandbox_loop, args=(child, self.fn), daemon=True)
        self.proc.start()
        child.close()

    def __call__(self, html: str) -> tuple[str, str]:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send(html)
        if not self.conn.poll(self.timeout_s):
            self.kill()
            return "timeout", ""
        try:
            return self.conn.recv()
        except EOFError:  # the child died (e.g. a segfault in the parser)
            self.kill()
            return "error", "extractor process died"

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join()
            self.conn.close()
        self.proc = self.conn = None

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(timeout=1)
        self.kill()


@dataclass
class Extract(Step):
    """Turns documents with `metadata["format"] == "html"` into text; other documents pass as they are."""

    type: ClassVar[str] = "extract"
    name: str = "extract"
    backend: str = "resiliparse"
    main_content: bool = True
    alt_texts: bool = True          # Llama 3 §3.1.1: keep alt text (maths as LaTeX)
    remove_markdown: bool = True    # Llama 3 §3.1.1: remove all markdown markers
    timeout_s: float = 2.0          # per page; 0 runs in-process with no limit
    min_chars: int = 1
    # Python API only (tests, custom extractors): replaces the backend.
    extractor: Callable[[str], str] | None = None

    def _fn(self) -> Callable[[str], str]:
        if self.extractor is not None:
            return self.extractor
        backend, main, alt = self.backend, self.main_content, self.alt_texts
        if backend not in ("resiliparse", "trafilatura"):
            raise ValueError(f"extract: unknown backend {backend!r}; use 'resiliparse' or 'trafilatura'")
        return lambda html: extract_html(html, backend=backend, main_content=main, alt_texts=alt)

    def __call__(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        fn = self._fn()
        sandbox = _Sandbox(fn, self.timeout_s) if self.timeout_s > 0 else None
        try:
            for doc in docs:
                stats.docs_in += 1
                stats.chars_in += len(doc.text)
                if doc.metadata.get("format") == "html":
                    if sandbox is None:
                        status, text = "ok", fn(doc.text)
                    else:
                        status, text = sandbox(doc.text)
                    if status != "ok":
                        stats.drop(f"extract_{status}")
                        continue
                    if self.remove_markdown:
                        text = strip_markdown(text)
                    doc.text = text
                    doc.metadata["format"] = "text"
                    stats.modified += 1
                if len(doc.text.strip()) < self.min_chars:
                    stats.drop("extract_empty")
                    continue
                stats.docs_out += 1
                stats.chars_out += len(doc.text)
                yield doc
        finally:
            if sandbox is not None:
                sandbox.close()
