"""The README's command tour as data: the steps tests/integration/test_readme_tour.py runs in order.

The tour is the part of README.md from `## Command tour` to the next `## ` heading. Its fenced code
blocks are read as follows, so that the README stays the one place the commands are written:

- a plain block (no language): every line starting with `$ ` is a command; a line ending in `\\`
  or inside an open quote continues on the next one, and a here-document (`<<'EOF'` ... `EOF`)
  includes its body. The other lines are the output the README shows, kept beside the command.
  A plain block without `$ ` lines holds shell setup (`SMOL=...`): each of its lines must be an
  assignment, and every later command runs after them.
  A command that fails on purpose ends its first line with the comment `# exit status N`.
- a `python` block is a program, run with the test's Python.
- other languages (`toml`, ...) are not run.

An HTML comment just before a block changes how its steps run (`<!-- tour: KEYWORD ARGS -->`;
several comments may precede one block):

- `serve`: each `$ herd serve ...` in the block starts a server in the background, and the test
  waits for its /health before the next command. The server stays up for the `python` blocks that
  follow and stops at the next shell block without this marker, at the next `herd serve`, or at the
  end of the tour. (The test runs it on a free port instead of 8000.)
- `stdin`: the block shows an interactive session; its lines after `you> ` are sent to the
  command's standard input, then end-of-file.
- `requires NAME: REASON`: the block's steps are skipped when NAME is missing: a Python module,
  a program on PATH, or `cuda` for a GPU. The skip names the step and the reason.
- `skip: REASON`: the block's steps are never run by the test (e.g. a command that takes longer
  than the whole test may); the reason is shown with the skip.
- `ignore`: the block is not part of the tour (an excerpt of output, not something to run).

Anything else inside `<!-- tour: ... -->` is an error, as is a shell block that has neither
commands nor assignments: a new block must say what it is.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

TOUR_HEADING = "## Command tour"
_MARKER = re.compile(r"^<!--\s*tour:\s*(.*?)\s*-->\s*$")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")
_STATUS = re.compile(r"#\s*exit status (\d+)\s*$")
_KEYWORDS = ("serve", "stdin", "requires", "skip", "ignore")


@dataclass
class Step:
    """One thing the test runs: a shell command, a block of setup assignments, or a Python program."""

    kind: str  # "shell" | "setup" | "python"
    code: str  # the command with its continuations and here-document, as bash reads it
    line: int  # 1-based line in README.md, for messages
    output: list[str] = field(default_factory=list)  # what the README shows after it
    background: bool = False  # a server: started, waited for, stopped later
    stdin: str | None = None
    requires: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    skip: str | None = None
    block: int = 0  # index of the code block it came from
    block_serves: bool = False  # its block is marked `serve` (a running server may stay up)
    status: int = 0  # the exit status the README shows on purpose (`# exit status N`)

    @property
    def name(self) -> str:
        """A short, stable name for test ids and skip messages: the command's first words."""
        if self.kind == "setup":
            return f"L{self.line} setup " + " ".join(a.split("=", 1)[0] for a in self.code.split("\n"))
        first = self.code.split("\n", 1)[0].strip()
        if self.kind == "python":
            return f"L{self.line} python " + first[:40]
        words = []
        for word in first.split():
            if word.startswith(("-", "#", "|")) or len(words) == 4:
                break
            words.append(word)
        return f"L{self.line} " + " ".join(words)


def tour_section(readme: str) -> tuple[list[str], int]:
    """The tour's lines and the 1-based line number of its heading."""
    lines = readme.splitlines()
    try:
        start = lines.index(TOUR_HEADING)
    except ValueError:
        raise ValueError(f"README has no {TOUR_HEADING!r} heading") from None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end], start + 1


def _parse_marker(text: str, line: int) -> tuple[str, str]:
    keyword, _, rest = text.partition(" ")
    keyword = keyword.rstrip(":")
    if keyword not in _KEYWORDS:
        raise ValueError(f"README line {line}: unknown tour marker {text!r}; use one of {', '.join(_KEYWORDS)}")
    return keyword, rest.strip()


def _incomplete(command: str) -> bool:
    """Whether bash reads on: a trailing backslash, or a quote still open (a JSON body over lines)."""
    if command.endswith("\\"):
        return True
    try:
        shlex.split(command, comments=True)
    except ValueError:  # "No closing quotation"
        return True
    return False


def _shell_commands(body: list[str], first_line: int) -> list[tuple[str, int, list[str]]]:
    """(command, line, output lines) for each `$ ` line of a block, continuations and heredocs joined."""
    out: list[tuple[str, int, list[str]]] = []
    i = 0
    while i < len(body):
        text = body[i]
        if not text.startswith("$ "):
            if out:
                out[-1][2].append(text)
            i += 1
            continue
        line, parts = first_line + i, [text[2:]]
        while _incomplete("\n".join(parts)) and i + 1 < len(body):
            i += 1
            parts.append(body[i])
        for match in _HEREDOC.finditer("\n".join(parts)):
            delimiter = match.group(2)
            while True:
                i += 1
                if i >= len(body):
                    raise ValueError(f"README line {line}: here-document {delimiter!r} is not closed in its block")
                parts.append(body[i])
                if body[i] == delimiter:
                    break
        out.append(("\n".join(parts), line, []))
        i += 1
    return out


def parse_tour(readme: str) -> list[Step]:
    """Every step of the tour, in README order (see the module docstring for the rules)."""
    lines, offset = tour_section(readme)
    steps: list[Step] = []
    markers: list[tuple[str, str]] = []
    block_no = 0
    i = 0
    while i < len(lines):
        text = lines[i]
        marker = _MARKER.match(text.strip())
        if marker:
            markers.append(_parse_marker(marker.group(1), offset + i))
            i += 1
            continue
        if not text.startswith("```"):
            i += 1
            continue
        language = text[3:].strip()
        start = i + 1
        end = next((j for j in range(start, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise ValueError(f"README line {offset + i}: code block is not closed")
        body, first_line = lines[start:end], offset + start
        block_markers, markers = markers, []
        i = end + 1
        block_no += 1
        keys = dict(block_markers)
        if "ignore" in keys or language not in ("", "python", "sh", "bash", "console"):
            continue
        requires = []
        for key, rest in block_markers:
            if key == "requires":
                name, _, reason = rest.partition(":")
                if not name.strip() or not reason.strip():
                    raise ValueError(f"README line {first_line - 1}: write `<!-- tour: requires NAME: REASON -->`")
                requires.append((name.strip(), reason.strip()))
        common = dict(requires=requires, skip=keys.get("skip") or None, block=block_no, block_serves="serve" in keys)
        if language == "python":
            steps.append(Step("python", "\n".join(body) + "\n", first_line, **common))
            continue
        commands = _shell_commands(body, first_line)
        if not commands:
            setup = [x for x in body if x.strip()]
            bad = [x for x in setup if not _ASSIGNMENT.match(x)]
            if bad or not setup:
                raise ValueError(f"README line {first_line}: a tour block with no `$ ` commands must hold only "
                                 f"shell assignments (got {bad[:1] or 'nothing'}); mark it `<!-- tour: ignore -->` "
                                 "if it is not meant to run")
            steps.append(Step("setup", "\n".join(setup), first_line, **common))
            continue
        stdin = None
        if "stdin" in keys:
            stdin = "".join(x[len("you> "):] + "\n" for x in body if x.startswith("you> "))
        for code, line, output in commands:
            background = "serve" in keys and code.split()[:2] == ["herd", "serve"]
            status = _STATUS.search(code.split("\n", 1)[0])
            steps.append(Step("shell", code, line, output, background=background, stdin=stdin,
                              status=int(status.group(1)) if status else 0, **common))
    if markers:
        raise ValueError(f"README: tour marker(s) {markers} after the last code block of the tour")
    return steps


def load_tour(readme_path: Path) -> list[Step]:
    return parse_tour(readme_path.read_text(encoding="utf-8"))
