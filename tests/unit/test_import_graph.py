"""The dependency direction in ARCHITECTURE.md, checked on the source itself.

model <- {generate, quant, parallel} <- train <- posttrain; tokenizer <- {data, generate, serve};
nothing imports cli.py, and serve/ only posttrain (rejection sampling generates its candidates
through serve's engine and batch generator; serve itself imports nothing above generate, so no
cycle, and the engine needs only torch). Each subpackage may import only the ones listed for it.
The bottom layer (io: atomic writes and the cache folder; config: the TOML -> dataclass loader;
gguf_header: the GGUF header reader that model and tokenizer share) imports nothing from herd,
and everyone may import it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "herd"

ALLOWED: dict[str, set[str]] = {
    "model": set(),
    "tokenizer": set(),
    "kernels": set(),  # compiled CPU ops; used by quant (quantized linears) and generate (decode)
    "generate": {"model", "tokenizer", "kernels", "quant"},  # quant: loading.py opens quantized dirs
    "quant": {"model", "kernels"},
    "parallel": {"model"},
    "data": {"tokenizer"},
    "train": {"model", "tokenizer", "generate", "quant", "parallel", "data"},
    "eval": {"model", "tokenizer", "generate", "quant", "data", "train"},
    "posttrain": {"model", "tokenizer", "generate", "quant", "parallel", "data", "train", "eval", "serve"},
    "serve": {"model", "tokenizer", "generate", "quant"},
}
# Top-level modules: the package root stays light; entry points may use anything but each other.
BOTTOM = {"io", "config", "gguf_header", "targets"}
TOP_LEVEL: dict[str, set[str] | None] = {"io": set(), "config": set(), "gguf_header": set(), "targets": set(), "__init__": {"model"}, "__main__": {"cli"}, "cli": None, "demo": None}


def _herd_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "herd" and len(parts) > 1:
                found.add(parts[1])
    return found


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        yield (rel.parts[0] if len(rel.parts) > 1 else rel.stem), path


@pytest.mark.parametrize("unit, path", list(_modules()), ids=lambda v: str(v))
def test_imports_follow_the_dependency_direction(unit, path):
    imported = _herd_imports(path) - {unit}
    if unit in BOTTOM:
        assert not imported, f"{path}: herd.{unit} is the bottom layer and imports nothing from herd"
        return
    imported -= BOTTOM
    if unit in ALLOWED:
        allowed = ALLOWED[unit]
    else:
        assert unit in TOP_LEVEL, f"{path}: new top-level unit {unit!r}; add it to ALLOWED with its dependencies"
        allowed = TOP_LEVEL[unit]
        if allowed is None:  # entry points may import any library unit
            allowed = set(ALLOWED) | {"demo"}
    bad = imported - allowed
    assert not bad, f"{path.relative_to(ROOT.parent)} imports herd.{sorted(bad)}, which {unit} must not depend on"


def test_nothing_imports_serve_or_cli():
    for unit, path in _modules():
        if unit in ("serve", "cli", "__main__"):
            continue
        imported = _herd_imports(path)
        assert "cli" not in imported, f"{path} imports cli"
        if unit != "posttrain":  # rejection sampling runs on the engine (see the module docstring)
            assert "serve" not in imported, f"{path} imports serve"


def test_model_code_is_pure_math():
    # No distributed code, file I/O or device choice in the forward-pass modules.
    for name in ("llama.py", "rope.py", "args.py", "vision.py", "mllama.py"):
        src = (ROOT / "model" / name).read_text()
        for banned in ("torch.distributed", "open(", ".cuda(", "torch.load", "torch.save"):
            assert banned not in src, f"herd/model/{name} contains {banned!r}"
