"""svidgate: the umbrella package (command line, dev stack) and, under ``svidgate.signer.v1``,
the generated gRPC contract shared by the gateway and the signer."""
