"""herd: the Llama 3 system in PyTorch.

`import herd` stays cheap: the checkpoint entry points are resolved on first use, so tools
that only need, say, the tokenizer do not pay for importing torch and safetensors.
"""

from typing import Any

_LAZY = {"load_model": "herd.model.formats", "save_model": "herd.model.formats"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'herd' has no attribute {name!r}")
