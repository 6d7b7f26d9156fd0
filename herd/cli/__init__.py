"""`herd <command>`: parse arguments, call the library, print. No logic of its own.

Each area's module (inference, checkpoints, training, data, evaluation) holds its commands, one
small function per command taking the parsed namespace, and a COMMANDS table of
name -> (function, one-line help, argument builder); shared argument groups live in `common`.
Library errors meant for users (ValueError, FileNotFoundError, FileExistsError) are printed as
one line and exit with status 2, without a traceback; so are usage errors, by argparse.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from herd.cli import checkpoints, data, evaluation, inference, training
from herd.cli.common import HelpFormatter, resolve_device, resolve_dtype

# A name with a space is a nested command: "data tokenize" is `herd data tokenize`.
COMMANDS: dict[str, tuple[Callable, str, Callable]] = {
    **inference.COMMANDS, **checkpoints.COMMANDS, **training.COMMANDS, **data.COMMANDS, **evaluation.COMMANDS,
}


class _Version(argparse.Action):
    """`herd --version`: the installed distribution's version, the one number pyproject.toml sets.
    Looked up only when asked, so a source checkout without an install still parses commands."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="print herd's version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"herd {version('herd')}")
        except PackageNotFoundError:
            parser.exit(2, "herd: error: herd is not installed, so it has no version; run `pip install -e .`\n")
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herd", description="Llama 3 in PyTorch: models, tokenizer, inference.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (_, help_text, add_args) in COMMANDS.items():
        group, _, leaf = name.partition(" ")
        if not leaf:
            p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        else:
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} commands", formatter_class=HelpFormatter)
                groups[group] = gp.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
            p = groups[group].add_parser(leaf, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.set_defaults(command_name=name)
        add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        opts = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors: argparse has printed them
        return e.code if isinstance(e.code, int) else 2
    opts.command = opts.command_name
    opts.argv = list(sys.argv[1:] if argv is None else argv)  # `--tp N` re-runs it under torchrun
    try:
        # Device and dtype are settled before the command runs, so an unusable device fails
        # before a checkpoint is read.
        if getattr(opts, "device", None) is not None:
            opts.device = resolve_device(opts.device)
        if getattr(opts, "dtype", None) is not None:
            opts.dtype = resolve_dtype(opts.dtype, opts.device)
        COMMANDS[opts.command][0](opts)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"herd {opts.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # one line for a torchrun group, not one per rank
            print("\ninterrupted", file=sys.stderr)
        return 130
    return 0
