"""The `optimum-lrpq` program: the parser built from the command modules, dispatch, and error handling.

Each command module (`quantize`, `evaluate`, `inspect`, `export`, `demo`) defines `add_parser(subparsers)`, which
sets the subparser's `func` to the module's `run(args) -> int`. Without a command the help is printed (exit status 0). A
`CLIError` is reported in one line with exit status 2, Ctrl-C with exit status 130.

Building the parser imports nothing heavy (the command modules import torch, transformers and datasets inside
`run`), so `--help` and `--version` answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from . import demo, evaluate, export, inspect, quantize
from .common import EXIT_ERROR, PROG, CLIError, one_line, progress_bars_off, progress_disabled

# (command name, module), in the order of the help text.
_COMMANDS = (("quantize", quantize), ("evaluate", evaluate), ("inspect", inspect), ("export", export),
             ("demo", demo))
COMMANDS = tuple(name for name, _ in _COMMANDS)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    from ..version import __version__

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Post-training quantization of Hugging Face vision transformers (ViT, DeiT, Swin, DINOv2) with "
        f"LRP-QViT: LRP relevance decides which layers get more bits. Start with '{prog} demo' (offline, seconds).",
        epilog=f"Run '{prog} <command> --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"optimum-lrpq {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for _, module in _COMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Entry point of `optimum-lrpq`; returns the exit status (0, or 2 for a reported error).

    Without arguments, prints the help and returns 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        parser.error(f"{argv[0]} is an option of a command, not of {prog} itself: put it after the command, e.g. "
                     f"'{prog} demo {argv[0]} ...' (commands: {', '.join(COMMANDS)})")
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:  # no command
        parser.print_help()
        return 0
    try:
        with _quiet_libraries(), progress_bars_off(progress_disabled(getattr(args, "quiet", False))):
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
    unreachable Hub takes ~30 s of retries), and progress bars stay (downloads, loading large models) unless
    --quiet or TQDM_DISABLE turns them off (`common.progress_bars_off`)."""
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
