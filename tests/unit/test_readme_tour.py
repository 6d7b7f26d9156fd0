"""How tests/integration/readme_tour.py reads the README's command tour (the slow test runs it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("herd_readme_tour", REPO / "tests" / "integration" / "readme_tour.py")
readme_tour = sys.modules.setdefault("herd_readme_tour", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(readme_tour)

SNIPPET = """# herd

## Set-up

```
$ make demo
```

## Command tour

Text with `$ not a command`.

```
SMOL=runs/demo/smol.gguf
OUT=runs/out
```

```
$ herd info $SMOL
            path  runs/demo/smol.gguf
$ herd train configs/debug.toml --nproc 2 \\
    --job.out_dir runs/tp2 \\
    --metrics.progress false
step 1/2
$ cat > runs/demo/task.jsonl <<'EOF'
{"question": "q", "choices": ["a", "b"], "answer": 0}
$ not a command inside a here-document
EOF
$ herd eval mc runs/demo/m --task runs/demo/task.jsonl
$ herd generate $SMOL --tp 2     # exit status 2
herd generate: error: --tp 2 does not divide n_kv_heads=3
```

<!-- tour: stdin -->
```
$ herd chat $SMOL --temperature 0
you> First question?
llama> An answer.
you> Second?
```

<!-- tour: serve -->
```
$ herd serve $SMOL --max-batch 4
$ curl -s http://127.0.0.1:8000/v1/completions \\
    -d '{"model": "m",
         "prompt": "hi"}'
{"data": []}
```

```python
print("client")
```

```toml
[not] = "run"
```

<!-- tour: requires lm_eval: the lm-eval extra -->
<!-- tour: skip: takes an hour -->
```
$ herd eval lm-eval runs/demo/m --tasks t
```

<!-- tour: ignore -->
```
> sample output, not a command
```

## Using it from Python

```
$ herd never-run
```
"""


def test_commands_continuations_heredocs_and_markers():
    steps = readme_tour.parse_tour(SNIPPET)
    assert [s.kind for s in steps] == ["setup"] + ["shell"] * 5 + ["shell"] * 3 + ["python", "shell"]
    setup, info, train, heredoc, mc, refused, chat, serve, curl, client, lm_eval = steps
    assert refused.status == 2 and all(s.status == 0 for s in steps if s is not refused)
    assert setup.code == "SMOL=runs/demo/smol.gguf\nOUT=runs/out"
    assert info.code == "herd info $SMOL" and info.output == ["            path  runs/demo/smol.gguf"]
    assert train.code == ("herd train configs/debug.toml --nproc 2 \\\n    --job.out_dir runs/tp2 \\\n"
                          "    --metrics.progress false")
    assert train.output == ["step 1/2"]
    assert heredoc.code == ("cat > runs/demo/task.jsonl <<'EOF'\n"
                            '{"question": "q", "choices": ["a", "b"], "answer": 0}\n'
                            "$ not a command inside a here-document\nEOF")
    assert mc.code == "herd eval mc runs/demo/m --task runs/demo/task.jsonl"
    assert chat.stdin == "First question?\nSecond?\n" and not chat.background
    assert serve.background and serve.block_serves and not curl.background and curl.block_serves
    assert curl.output == ['{"data": []}']  # the open quote carried the command over two lines
    assert curl.code.endswith('-d \'{"model": "m",\n         "prompt": "hi"}\'')
    assert client.code == 'print("client")\n'
    assert lm_eval.requires == [("lm_eval", "the lm-eval extra")] and lm_eval.skip == "takes an hour"
    assert all(s.skip is None and not s.requires for s in steps[:-1])
    # README line numbers and names for skip messages and test ids
    lines = SNIPPET.splitlines()
    assert lines[train.line - 1].startswith("$ herd train")
    assert train.name == f"L{train.line} herd train configs/debug.toml"
    assert setup.name == f"L{setup.line} setup SMOL OUT"


@pytest.mark.parametrize("snippet, message", [
    ("## Command tour\n<!-- tour: background -->\n```\n$ herd serve x\n```\n", "unknown tour marker"),
    ("## Command tour\n```\nsome output without a command\n```\n", "only shell assignments"),
    ("## Command tour\n```\n$ cat > f <<EOF\nnever closed\n```\n", "here-document 'EOF' is not closed"),
    ("## Command tour\n```\n$ herd info x\n", "not closed"),
    ("## Command tour\n<!-- tour: requires lm_eval -->\n```\n$ herd x\n```\n", "requires NAME: REASON"),
    ("## Set-up\n", "no '## Command tour' heading"),
])
def test_blocks_that_do_not_say_what_they_are_are_errors(snippet, message):
    with pytest.raises(ValueError, match=message):
        readme_tour.parse_tour(snippet)


def test_the_real_readme_parses():
    steps = readme_tour.load_tour(REPO / "README.md")
    assert steps[0].kind == "setup" and steps[0].code.startswith("SMOL=")
    assert any(s.background for s in steps), "the tour's herd serve block must be marked `serve`"
    commands = [s.code.split()[:2] for s in steps if s.kind == "shell"]
    assert ["herd", "info"] in commands and ["herd", "train"] in commands
