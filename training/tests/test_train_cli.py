"""The `cdul-train` dispatcher: lazy subcommand imports and one-line usage errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cdul_training import cli


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdul_training.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_help_lists_every_subcommand() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for name in cli.SUBCOMMANDS:
        assert name in result.stdout


def test_top_level_help_imports_no_subcommand() -> None:
    code = (
        "import sys\n"
        "from cdul_training import cli\n"
        "cli.build_parser(None)\n"
        "loaded = [m for m, _ in cli.SUBCOMMANDS.values() if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == ""


def test_evaluate_cache_loads_no_torch() -> None:
    code = (
        "import sys\n"
        "from cdul_training import cli\n"
        "cli.build_parser('evaluate-cache')\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--log-level", "loud", "evaluate-cache", "--cache", "x.npz"], "--log-level must be one"),
        (["evaluate-cache"], "--cache"),
        (["no-such-command"], "invalid choice"),
    ],
)
def test_bad_arguments_give_one_line(argv: list[str], expected: str) -> None:
    result = run_cli(*argv)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "--help" in lines[0]
