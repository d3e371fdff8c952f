"""svidgate signer: grpc.aio sidecar that mints and verifies JWTs with keys from Vault."""
