"""Shared test infrastructure, importable as ``support.*`` (pyproject's pytest ``pythonpath``
lists ``tests``); tests/conftest.py turns it into fixtures.

- :mod:`support.bao` — a real OpenBao dev server (``BaoServer``) and its setup helpers.
- :mod:`support.clock` — a clock a test can move forward (KeyStore's injectable clock).
- :mod:`support.pki` — the test PKI: one CA per trust domain and the SVIDs every suite uses.
- :mod:`support.ports` — free loopback ports.
- :mod:`support.signer_process` — ``svidgate signer serve`` as a real child process (the one
  signer launcher; ``SignerProcess.file_keys`` writes the usual file-key config) and Sign /
  Rotate over its Unix socket.
- :mod:`support.waiting` — waiting on a condition with a deadline (never a fixed sleep).

Gateway child processes are the gateway suite's ``gateway_harness.GatewayProcess``.
"""
