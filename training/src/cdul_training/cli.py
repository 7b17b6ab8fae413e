"""The `cdul-train` command line: one subcommand per module, imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

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


class UsageError(Exception):
    """A bad command-line value; the message names the value and the fix. Exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """Build the parser with every subcommand's options, importing each subcommand module."""
    parser = argparse.ArgumentParser(prog="cdul-train", description=__doc__)
    parser.add_argument(
        "--log-level", default="INFO", help="logging level: DEBUG, INFO, WARNING (default INFO)"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `cdul-train`; returns the exit status (2 for bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
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
