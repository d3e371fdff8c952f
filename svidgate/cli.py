"""The ``svidgate`` command: one entry point that dispatches to each package's subcommands.

Each package owns its subcommands in ``<package>/cli.py`` through ``register(subparsers)``;
those modules import heavy dependencies (grpc, aiohttp, hvac) inside their handlers so that
``svidgate pki …`` starts fast. Every user error ends as one line on stderr and exit code 2;
an unexpected error is one line too (exit 1), with the traceback only when SVIDGATE_DEBUG=1.
``svidgate --version`` prints ``svidgate <version>``. When stdout is a pipe whose reader has
gone (``svidgate gateway check … | head -1``), the command stops quietly with exit code 141
(128 + SIGPIPE, what a shell reports for ``cat`` in the same place): nothing on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

Handler = Callable[[argparse.Namespace], int]

EXIT_USAGE = 2
EXIT_INTERNAL = 1
EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line on stderr (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception bases whose message is written for the user (one per package, one for
    the config kernel shared by the gateway and the signer)."""
    from svidgate.config import ConfigError
    from svidgate.gateway.errors import GatewayError
    from svidgate.pki.errors import PkiError
    from svidgate.signer.errors import SignerError

    return (ConfigError, PkiError, SignerError, GatewayError)


def version() -> str:
    """The installed distribution's version, or the package's own when it is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("svidgate")
    except PackageNotFoundError:
        from svidgate import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    from svidgate import devstack
    from svidgate.gateway import cli as gateway_cli
    from svidgate.pki import cli as pki_cli
    from svidgate.signer import cli as signer_cli

    parser = OneLineParser(
        prog="svidgate",
        description="Zero-trust identity gateway: SPIFFE mTLS, RBAC and JWTs from a signer.",
    )
    parser.add_argument("--version", action="version", version=f"svidgate {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    devstack.register(sub)
    pki_cli.register(sub)
    signer_cli.register(sub)
    gateway_cli.register(sub)
    return parser


# Options whose value may begin with "-": a key id is base64url (RFC 7638 thumbprint), so about
# one in 64 starts with "-", which argparse would take for an option ("expected one argument").
DASH_VALUE_OPTIONS = frozenset({"--kid"})


def join_dash_values(argv: Sequence[str]) -> list[str]:
    """``--kid -abc`` → ``--kid=-abc`` for the options in DASH_VALUE_OPTIONS."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        value = next(args, None) if arg in DASH_VALUE_OPTIONS else None
        out.append(arg if value is None else f"{arg}={value}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(join_dash_values(sys.argv[1:] if argv is None else argv))
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except user_error_types() as exc:
        return report_user_error(exc)
    except Exception as exc:
        if isinstance(exc, BrokenPipeError) and stdout_reader_gone():
            return silence_stdout()
        if os.environ.get("SVIDGATE_DEBUG") == "1":
            raise
        print(
            f"svidgate: internal error: {type(exc).__name__} (set SVIDGATE_DEBUG=1 for details)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def report_user_error(exc: BaseException) -> int:
    """One stderr line for a bad config, file or argument; returns the exit code (2)."""
    print(f"svidgate: error: {exc}", file=sys.stderr)
    return EXIT_USAGE


def stdout_reader_gone() -> bool:
    """True when stdout is a pipe (or socket) whose reading end is closed."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def silence_stdout() -> int:
    """Point stdout at /dev/null so that the interpreter's last flush cannot fail ("Exception
    ignored … BrokenPipeError"); returns the exit code for a closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def run() -> NoReturn:
    code = main()
    try:
        sys.stdout.flush()  # what is still buffered meets a closed pipe here, not at exit
    except BrokenPipeError:
        code = silence_stdout()
    sys.exit(code)


if __name__ == "__main__":
    run()
