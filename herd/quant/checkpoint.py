"""Quantized checkpoints: one safetensors file of codes and scales, and a JSON file saying how.

A directory holds `quant_config.json` (format tag, scheme of the blocks, the head's format,
group size, the activation bound, which modules are quantized and with what, and the exact
`ModelArgs`) and `model.safetensors`
(herd/Meta parameter names; a quantized module contributes `weight` plus `scale` or `scales`
and `mins`), plus the tokenizer files (and generation_config.json) of the source checkpoint.

Trade-off: herd's own layout rather than an HF `quantization_config` one. No other loader can
run these formats anyway, and a directory that HF or `herd.load_model` half-recognised would
fail later and more confusingly; `herd.load_model` instead names `load_quantized` when it sees
`quant_config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from herd.io import atomic_dir, write_files
from herd.model.args import ModelArgs
from herd.model.formats import HF_GENERATION_CONFIG, TOKENIZER_FILES, load_model
from herd.model.llama import Transformer
from herd.quant.apply import QUANTIZED_TYPES, QuantConfig, QuantReport, quantize
from herd.quant.linear import Fp8Linear, Int4Linear, Int8Linear

QUANT_CONFIG = "quant_config.json"
WEIGHTS = "model.safetensors"
FORMAT_TAG = "herd-quant-v1"


def _scheme_of(module: torch.nn.Module) -> str:
    return {Int8Linear: "int8", Int4Linear: "int4", Fp8Linear: "fp8"}[type(module)]


def save_quantized(
    model: Transformer,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    copy_from: str | os.PathLike | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write a quantized `model` to directory `path`, atomically (a temp dir renamed into place).

    copy_from: a checkpoint directory whose tokenizer files and generation_config.json are
    copied as they are (same relative paths), so herd finds the tokenizer and its stop ids.
    extra_files: relative path -> bytes to write as well (they win over copied files).
    """
    dst = Path(path)
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES)}
    if not quantized:
        raise ValueError("the model has no quantized modules; run herd.quant.quantize(model, config) first, "
                         "or save float models with herd.save_model")
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) or choose another path")
    # The head has its own format (QuantConfig.head): "scheme" names the blocks' one.
    body = sorted({_scheme_of(m) for name, m in quantized.items() if name != "output"})
    first = next(iter(quantized.values()))
    int4 = {name: m.group_size for name, m in quantized.items() if isinstance(m, Int4Linear)}
    fp8 = [m for m in quantized.values() if isinstance(m, Fp8Linear)]
    config: dict[str, Any] = {
        "format": FORMAT_TAG,
        "scheme": body[0] if len(body) == 1 else "mixed",
        "head": _scheme_of(quantized["output"]) if "output" in quantized else "float",
        "group_size": max(set(int4.values()), key=list(int4.values()).count) if int4 else None,
        "activation_scale_ub": fp8[0].activation_scale_ub if fp8 else None,
        "activations": getattr(first, "activations", "float"),
        "modules": {name: _scheme_of(m) for name, m in quantized.items()},
        "model_args": dataclasses.asdict(model.args),
    }
    if len(set(int4.values())) > 1:  # e.g. GGUF Q4 blocks at 32 beside the recipe's 64
        config["group_sizes"] = int4
    state = model.state_dict()
    # safetensors refuses two names for one storage: a tied, unquantized head is re-tied on load.
    if "output.weight" in state and model.output.weight is model.tok_embeddings.weight:
        del state["output.weight"]
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    files: dict[str, bytes] = {}
    if copy_from is not None:
        src = Path(copy_from)
        names = (*TOKENIZER_FILES, HF_GENERATION_CONFIG)
        files = {n: (src / n).read_bytes() for n in names if (src / n).is_file()}
    files.update(extra_files or {})

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "herd_quant": config["scheme"]})
        write_files(tmp, {**files, QUANT_CONFIG: (json.dumps(config, indent=2) + "\n").encode()})

    return atomic_dir(dst, write, overwrite=overwrite)


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


def read_quant_config(path: str | os.PathLike) -> dict[str, Any]:
    root = Path(path)
    cfg_file = root / QUANT_CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{root} has no {QUANT_CONFIG}, so it is not a herd-quantized checkpoint; load float checkpoints "
            "with herd.load_model, or write a quantized one with `herd quantize SRC DST --scheme int8`"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({e}); the file is corrupt or truncated") from e
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT_TAG:
        raise ValueError(f"{cfg_file} is not a {FORMAT_TAG} file (format: {cfg.get('format')!r}); re-run herd quantize")
    return cfg


def _shell(name: str, scheme: str, in_features: int, out_features: int, cfg: dict[str, Any]) -> torch.nn.Module:
    if scheme == "int8":
        # "activations" is absent from files written before the int8-activation mode: exact.
        return Int8Linear(in_features, out_features, activations=cfg.get("activations", "float"), device="meta")
    if scheme == "int4":
        group_size = cfg.get("group_sizes", {}).get(name, cfg["group_size"])
        return Int4Linear(in_features, out_features, group_size=int(group_size),
                          activations=cfg.get("activations", "float"), device="meta")
    if scheme == "fp8":
        return Fp8Linear(in_features, out_features, activation_scale_ub=float(cfg["activation_scale_ub"]),
                         device="meta")
    raise ValueError(f"unknown scheme {scheme!r} in {QUANT_CONFIG}; it was written by a newer herd")


def load_quantized(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    max_seq_len: int | None = None,
) -> Transformer:
    """Load a directory written by `save_quantized` / `herd quantize`.

    dtype: for the float tensors (embedding, norms, unquantized layers); None keeps the saved
    dtype. Codes and scales always keep theirs.
    """
    root = Path(path)
    cfg = read_quant_config(root)
    try:
        args = ModelArgs(**cfg["model_args"])
    except (TypeError, KeyError) as e:
        raise ValueError(f"{root / QUANT_CONFIG}: bad model_args ({e}); re-run herd quantize") from e
    if max_seq_len is not None:
        args = args.replace(max_seq_len=max_seq_len)
    weights = root / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; the quantized checkpoint is incomplete, re-run herd quantize")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except safetensors.SafetensorError as e:
        raise ValueError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {e}") from e

    # "head" is absent from files written before QuantConfig.head: "modules" alone says it all.
    head = cfg.get("head", cfg["modules"].get("output", "float"))
    if head != cfg["modules"].get("output", "float"):
        raise ValueError(f"{root / QUANT_CONFIG}: head {head!r} disagrees with modules['output'] "
                         f"({cfg['modules'].get('output')!r}); the file was edited by hand, re-run herd quantize")
    with torch.device("meta"):
        model = Transformer(args)
    for name, scheme in cfg["modules"].items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{QUANT_CONFIG} names module {name!r}, which this model does not have") from None
        new = _shell(name, scheme, linear.in_features, linear.out_features, cfg)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    expected = model.state_dict()
    tied_head = args.tie_embeddings and "output" not in cfg["modules"]
    if tied_head:
        expected.pop("output.weight")
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights} does not match {QUANT_CONFIG}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for key, ref in expected.items():
        t = sd[key]
        if t.shape != ref.shape:
            raise ValueError(f"{weights}: {key} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        scheme = cfg["modules"].get(key.rpartition(".")[0])
        if scheme is None:  # embedding, norms, unquantized layers: cast as asked
            sd[key] = t.to(device=device, dtype=dtype or t.dtype)
        elif t.dtype != ref.dtype:
            raise ValueError(f"{weights}: {key} is {t.dtype}, but the {scheme} format stores {ref.dtype}")
        else:
            sd[key] = t.to(device)  # codes and scales exactly as saved
    if tied_head:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if tied_head:
        model.tie_weights()
    model.freqs_cis = torch.empty(0, device=device)  # built on meta; recompute on the real device
    model.init_rope()
    return model


def quantize_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, config: QuantConfig, *, overwrite: bool = False,
    extra_files: Mapping[str, bytes] | None = None,
) -> QuantReport:
    """`herd quantize SRC DST`: load a float checkpoint, quantize it, save it with its tokenizer.

    A .gguf SRC keeps its Q4_0 / Q4_1 blocks exactly (int4 at group 32) and applies `config` to
    the rest (`quantized_model_from_gguf`), instead of rounding the file's 4-bit weights again.
    A directory's tokenizer files are copied; `extra_files` (relative path -> bytes) adds files
    such as the tokenizer of a GGUF source, which this package cannot write itself.
    """
    if Path(src).suffix.lower() == ".gguf":
        from herd.quant.gguf_blocks import quantized_model_from_gguf

        built = quantized_model_from_gguf(src, config)
        model, report = built.model, built.report
    else:
        model = load_model(src)
        report = quantize(model, config)
    save_quantized(model, dst, overwrite=overwrite, copy_from=src if Path(src).is_dir() else None,
                   extra_files=extra_files)
    return report
