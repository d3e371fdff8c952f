"""The root `svidgate` command: help, unknown commands, one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest


def _svidgate() -> str:
    beside = Path(sys.executable).with_name("svidgate")
    found = str(beside) if beside.exists() else shutil.which("svidgate")
    assert found, "the svidgate console script is not installed (pip install -e .)"
    return found


SVIDGATE = _svidgate()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SVIDGATE, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_help_lists_the_subcommands() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    assert proc.stderr == ""
    assert proc.stdout.startswith("usage: svidgate")
    for command in ("up", "pki", "signer", "gateway"):
        assert command in proc.stdout


@pytest.mark.parametrize("args", [["pki", "--help"], ["pki", "init", "--help"]])
def test_sub_help(args: list[str]) -> None:
    proc = run(*args)
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"usage: svidgate {' '.join(args[:-1])}")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["bogus"], "invalid choice: 'bogus'"),
        ([], "the following arguments are required: COMMAND"),
        (["pki"], "the following arguments are required: COMMAND"),
        (["--no-such-flag"], "error:"),
        (["pki", "inspect", "f.pem", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_are_one_line_exit_2(args: list[str], fragment: str) -> None:
    proc = run(*args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("svidgate")
    assert "error:" in lines[0]
    assert fragment in lines[0]
    assert "Traceback" not in proc.stderr


def test_python_dash_m_entry_point_matches_the_script() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "svidgate.cli", "bogus"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1


def test_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "svidgate.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    assert proc.stderr == ""
    assert proc.stdout == f"svidgate {version('svidgate')}\n"
    assert run("--version").stdout == proc.stdout
    assert "--version" in run("--help").stdout


def test_a_kid_that_starts_with_a_dash_is_a_value_not_an_option(tmp_path: Path) -> None:
    """Kids are base64url thumbprints: about 1 in 64 starts with "-"; `--kid -abc` must revoke
    that kid, as documented, not fail with argparse's "expected one argument"."""
    from svidgate.cli import build_parser, join_dash_values

    argv = ["signer", "revoke", "--config", "s.yaml", "--kid", "-Ab_c"]
    args = build_parser().parse_args(join_dash_values(argv))
    assert args.kid == "-Ab_c"
    config = str(tmp_path / "missing.yaml")
    done = subprocess.run(
        [sys.executable, "-m", "svidgate.cli", "signer", "revoke", "--config", config, *argv[-2:]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "expected one argument" not in done.stderr
    assert done.returncode == 2 and "missing.yaml" in done.stderr  # the config, not the kid
