"""What several commands share: argument groups written once, and turning their strings into objects.

Device and dtype default to `auto`, the best this machine has (cuda with bf16 when torch sees a GPU,
else cpu with fp32: bf16 matmuls are slow on CPUs without AVX-512 BF16). They are resolved once,
before a command runs, so a device this torch cannot use fails as a one-line error before any
checkpoint is read.
"""

from __future__ import annotations

import argparse

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}
CHECKPOINT_HELP = "checkpoint: HF or Meta directory, .gguf file, or herd quantize output"
TOKENIZER_HELP = "tokenizer file or folder; default: the one the checkpoint declares"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `(default: X)` where there is a default worth showing: not for flags, None or []."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, []) or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


# ---- argument groups ---------------------------------------------------------------------------


def add_device_args(p: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    p.add_argument("--device", default="auto",
                   help="torch device: auto (cuda when torch sees a GPU, else cpu), cpu, cuda or cuda:N")
    if dtype:
        p.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                       help="auto: bf16 on cuda, fp32 on cpu")


def add_checkpoint_args(p: argparse.ArgumentParser, *,
                        context_help: str = "shorten the context (RoPE table and cache) to this many tokens",
                        context_aliases: tuple[str, ...] = ()) -> None:
    """A checkpoint opened for inference: path, tokenizer, device, dtype, context length
    (`context_aliases`: other spellings of --max-seq-len, e.g. vLLM's --max-model-len)."""
    p.add_argument("path", help=CHECKPOINT_HELP)
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    add_device_args(p)
    p.add_argument("--max-seq-len", *context_aliases, dest="max_seq_len", type=int, help=context_help)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most per prompt")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy; the default is Meta's")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling: the smallest set of tokens with this mass")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    p.add_argument("--seed", type=int, help="make sampling repeatable")
    p.add_argument("--system", help="system prompt (chat format)")


def add_output_args(p: argparse.ArgumentParser, *, name: str = "out", help: str) -> None:
    """A positional output path that is refused when it exists, unless --overwrite."""
    p.add_argument(name, help=help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output instead of stopping")


def int_list(text: str) -> list[int]:
    """argparse type for comma-separated integers (1e3 is accepted: sizes are often written so)."""
    try:
        return [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


# ---- resolving -----------------------------------------------------------------------------------


def resolve_device(name: str) -> str:
    """`auto` -> cuda when torch sees a GPU, else cpu; anything else is checked to be usable here."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use --device auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return str(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "torch sees no CUDA GPU"
            raise ValueError(f"--device {name}: {why} (torch {torch.__version__}); use --device cpu, or install a "
                             "CUDA build of torch on a machine with a GPU")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return str(device)
    backend = getattr(torch, device.type, None)  # torch.mps, torch.xpu, ...: each says if it is usable
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ValueError(f"--device {name}: torch {torch.__version__} cannot run on {device.type} here; "
                         "use --device cpu or auto")
    return str(device)


def resolve_dtype(name: str, device: str):
    """`auto` -> bf16 on a GPU, fp32 on cpu; fp32/bf16/fp16 (and their long names) as given."""
    import torch

    if name == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of auto, fp32, bf16, fp16")
    return getattr(torch, DTYPES[name])


def load(opts):
    """The checkpoint at opts.path (directory or .gguf) with its tokenizer and chat format."""
    from herd.generate.loading import load_for_inference

    return load_for_inference(opts.path, tokenizer=opts.tokenizer, dtype=opts.dtype, device=opts.device,
                              max_seq_len=opts.max_seq_len)


def sampling(opts):
    from herd.generate import SamplingParams

    return SamplingParams(temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k, seed=opts.seed)


# ---- config files (train, posttrain, data run) -----------------------------------------------------


def list_config_keys(p: argparse.ArgumentParser, config_class) -> None:
    """`--help` ends with every config section and key, its default and type (computed when asked,
    so building the parser imports no config module). `config_class()` returns the class."""
    base = p.format_help

    def format_help() -> str:
        from herd.config import describe_sections

        return (base() + "\nconfig sections and keys (default, type); a TOML file or --section.key VALUE sets them:\n"
                + describe_sections(config_class()) + "\n")

    p.format_help = format_help  # type: ignore[method-assign]


def print_config(overrides: list[str], load) -> bool:
    """`--print-config` anywhere among the overrides: print the resolved config as TOML (the file,
    the defaults it leaves out and the overrides; it reads back to the same config) and tell the
    caller to stop there. `load(rest)` builds the config from the other overrides."""
    from herd.config import to_toml

    if "--print-config" not in overrides:
        return False
    print(to_toml(load([a for a in overrides if a != "--print-config"])), end="")
    return True
