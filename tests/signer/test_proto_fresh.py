"""The committed gRPC stubs are exactly what `make proto` generates from signer.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from svidgate.signer.v1 import signer_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTO_REL = "svidgate/signer/v1/signer.proto"
GENERATED = ("signer_pb2.py", "signer_pb2.pyi", "signer_pb2_grpc.py")


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "proto" / PROTO_REL),
        ],
        check=True,
        capture_output=True,
    )
    committed_dir = ROOT / "proto" / "svidgate" / "signer" / "v1"
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "svidgate/signer/v1" / name).read_bytes()
        != (committed_dir / name).read_bytes()
    ]
    assert not stale, f"stale generated stubs {stale}: run `make proto` and commit them"


def test_contract_field_names() -> None:
    """Field names are the contract shared with the gateway: renaming one must fail here."""
    expected = {
        "SignRequest": {"audience", "ttl_seconds", "claims_json", "bind_certificate", "subject"},
        "SignResponse": {"token", "kid", "expires_at"},
        "VerifyRequest": {"token", "audience", "expected_subject", "certificate_thumbprint"},
        "VerifyResponse": {"claims_json", "kid", "subject", "expires_at"},
        "JWKS": {"jwks_json", "sequence", "max_ttl_seconds", "clock_skew_seconds"},
        "WatchKeysRequest": {"after_sequence"},
        "RotateResponse": {"prepared_kid", "active_kid"},
        "RevokeRequest": {"kid"},
        "RevokeResponse": {"revoked_kid", "active_kid"},
    }
    for message, fields in expected.items():
        descriptor = signer_pb2.DESCRIPTOR.message_types_by_name[message]
        assert fields <= set(descriptor.fields_by_name), message
    service = signer_pb2.DESCRIPTOR.services_by_name["Signer"]
    assert {m.name for m in service.methods} == {
        "Sign",
        "Verify",
        "GetJWKS",
        "WatchKeys",
        "Rotate",
        "Revoke",
    }
    revoke = service.methods_by_name["Revoke"]
    assert (revoke.input_type.name, revoke.output_type.name) == ("RevokeRequest", "RevokeResponse")
    assert not revoke.client_streaming and not revoke.server_streaming
    assert signer_pb2.DESCRIPTOR.package == "svidgate.signer.v1"
