"""The `cdul-train` command line: one subcommand per module, imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

# Subcommand name -> (module, one-line help). Each module defines
# `add_arguments(parser: argparse.ArgumentParser) -> None` and `run(args) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "evaluate-cache": (
        "cdul_training.cache_eval",
        "pseudo-label mAP of a cache of CLIP global and tile scores",
    ),
    "fit": ("cdul_training.fit", "train a classifier on pseudo labels with gradient alignment"),
    "compare": ("cdul_training.compare", "plot and tabulate several training runs side by side"),
    "train-clip": (
        "cdul_training.digits_clip",
        "train the small digits-clip model on scikit-learn's digits",
    ),
    "scenes": ("cdul_training.scenes", "write the digit-scenes multi-label corpus"),
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class UsageError(Exception):
    """A bad command-line value; the message names the value and the fix. Exit status 2."""


class _OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser that reports a bad option in one line instead of the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _log_level(value: str) -> str:
    level = value.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {value!r}"
        )
    return level


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Build the parser; only the module of `command` is imported and adds its options.

    Keeping the other subcommands unimported makes `cdul-train evaluate-cache` start without
    loading torch, and keeps one subcommand's import error from breaking the others.
    """
    parser = _OneLineErrorParser(prog="cdul-train", description=__doc__)
    parser.add_argument(
        "--log-level",
        type=_log_level,
        default="INFO",
        help=f"logging level, one of {', '.join(LOG_LEVELS)} (default INFO)",
    )
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_OneLineErrorParser
    )
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            sub.description = module.__doc__
            module.add_arguments(sub)
            sub.set_defaults(_module=module)
    return parser


def _find_command(argv: Sequence[str]) -> str | None:
    return next((token for token in argv if token in SUBCOMMANDS), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `cdul-train`; returns the exit status (2 for bad input)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_find_command(arguments))
    args = parser.parse_args(arguments)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args._module.run(args))
    except UsageError as err:
        print(f"cdul-train {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cdul-train {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
