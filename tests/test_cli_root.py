"""The root `svidgate` command: help, unknown commands, one-line errors, a closed stdout pipe
(`svidgate … | head -1`) ends quietly with exit code 141."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from svidgate.devstack import (
    Layout,
    Ports,
    gateway_config,
    prepare_pki,
    signer_config,
    write_yaml,
)


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


ROUTES = 1000  # `gateway check` then prints ~90 KB: more than a pipe holds (64 KiB)


@pytest.fixture(scope="module")
def dev_configs(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """`svidgate up`'s state directory, written but not started, with ROUTES extra routes."""
    layout = Layout(tmp_path_factory.mktemp("configs") / "state")
    layout.root.mkdir()
    prepare_pki(layout)
    ports = Ports(gateway=8443, admin=8444, upstream=9443, vault=None)
    socket_path = layout.root / "run" / "signer.sock"
    gateway = gateway_config(layout, socket_path, ports)
    public = gateway["routes"][1]
    gateway["routes"] += [
        {**public, "name": f"r{i}", "match": {"path_prefix": f"/r{i}"}} for i in range(ROUTES)
    ]
    write_yaml(layout.gateway_yaml, gateway, "gateway.yaml")
    write_yaml(layout.signer_yaml, signer_config(layout, socket_path, ports), "signer.yaml")
    return layout


def printing_commands(layout: Layout) -> dict[str, list[str]]:
    return {
        "gateway check": ["gateway", "check", "--config", str(layout.gateway_yaml)],
        "signer check": ["signer", "check", "--config", str(layout.signer_yaml)],
        "pki inspect": ["pki", "inspect", str(layout.cert("gateway"))],
    }


def stdout_env(*, buffered: bool) -> dict[str, str]:
    """The environment with Python's stdout block-buffered (a user's shell) or unbuffered."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return env if buffered else {**env, "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize("command", ["gateway check", "signer check", "pki inspect"])
def test_a_closed_stdout_pipe_ends_quietly(
    dev_configs: Layout, command: str, buffered: bool
) -> None:
    """stdout is a pipe nobody reads any more: the write fails inside the command (unbuffered,
    or gateway check printing more than stdout's buffer) or at the last flush (the short ones,
    buffered)."""
    args = printing_commands(dev_configs)[command]
    assert run(*args).returncode == 0  # the command itself works
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [SVIDGATE, *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
            env=stdout_env(buffered=buffered),
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == 141  # 128 + SIGPIPE, as a shell reports for `cat`


def test_gateway_check_into_head(dev_configs: Layout) -> None:
    """The shell pipeline a user types: the first line, nothing on stderr, exit status 141."""
    args = shlex.join([SVIDGATE, *printing_commands(dev_configs)["gateway check"]])
    done = subprocess.run(
        ["bash", "-c", f"{args} | head -1; exit ${{PIPESTATUS[0]}}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=stdout_env(buffered=True),
    )
    assert done.stderr == ""
    assert done.stdout == f"config:        {dev_configs.gateway_yaml} OK\n"
    assert done.returncode == 141
