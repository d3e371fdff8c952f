"""The signer contract (svidgate.signer.v1): generated stubs beside signer.proto, and the one
constant of the contract that is not a protobuf field."""

# Trailing metadata key of a failed RPC: its machine-readable reason code ("expired", ...).
REASON_METADATA_KEY = "svidgate-reason"
