"""svidgate: the umbrella package (command line, dev stack) and, under ``svidgate.signer.v1``,
the generated gRPC contract shared by the gateway and the signer."""

__version__ = "0.1.0"  # the fallback when the distribution is not installed (see cli.version)
