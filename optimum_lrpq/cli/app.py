"""The `optimum-lrpq` program: the parser built from the command modules, dispatch, and error handling.

Each command module (`quantize`, `evaluate`, `inspect`, `demo`) defines `add_parser(subparsers)`, which sets the
subparser's `func` to the module's `run(args) -> int`. A `CLIError` is reported in one line with exit status 2,
Ctrl-C with exit status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from . import demo, evaluate, inspect, quantize
from .common import EXIT_ERROR, PROG, CLIError, one_line

# (command name, module), in the order of the help text.
_COMMANDS = (("quantize", quantize), ("evaluate", evaluate), ("inspect", inspect), ("demo", demo))
COMMANDS = tuple(name for name, _ in _COMMANDS)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    from ..version import __version__

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Post-training quantization of Hugging Face vision transformers (ViT, DeiT, Swin, DINOv2) with "
        "LRP-QViT: LRP relevance decides which layers get more bits. Without a command, runs the offline demo.",
        epilog=f"Run '{prog} <command> --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"optimum-lrpq {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for _, module in _COMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Entry point of `optimum-lrpq`; returns the exit status (0, or 2 for a reported error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["demo", *argv]  # no command: the demo (options such as --output go to it)
    args = build_parser(prog).parse_args(argv)
    try:
        with _quiet_libraries():
            return args.func(args) or 0
    except CLIError as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _quiet_libraries():
    """transformers/datasets warnings off while a command runs. huggingface_hub keeps its retry warnings (an
    unreachable Hub takes ~30 s of retries), and progress bars stay (downloads, loading large models)."""
    import logging

    loggers = [logging.getLogger(name) for name in ("transformers", "datasets")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
