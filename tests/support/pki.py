"""The test PKI: one CA per trust domain (made with svidgate.pki.ca) and the X.509-SVIDs the
suites present, as files in one directory — ``NAME.crt`` / ``NAME.key`` per identity and one
bundle per trust domain (``bundle.pem`` for example.org, ``bundle-other.org.pem``).

tests/conftest.py builds it once per session (the ``pki`` fixture); a test that changes files
works on a private copy (:meth:`Pki.copy`, the gateway suite's ``test_pki``).
"""

from __future__ import annotations

import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from svidgate.pki.bundle import marshal_pem
from svidgate.pki.ca import CertificateAuthority
from svidgate.pki.spiffe_id import parse_spiffe_id

A = TD = "example.org"
B = "other.org"
SIGNER_ID = f"spiffe://{A}/signer"
GATEWAY_ID = f"spiffe://{A}/gateway"
UPSTREAM_ID = f"spiffe://{A}/orders"
CLIENT_ID = WEB_ID = f"spiffe://{A}/ns/shop/sa/web"
WRITER_ID = f"spiffe://{A}/ns/shop/sa/writer"
OPS_ID = f"spiffe://{A}/ops/alice"
ADMIN_ID = f"spiffe://{A}/admin"
MINTER_ID = f"spiffe://{A}/minter"
STRANGER_ID = f"spiffe://{A}/stranger"
B_ID = f"spiffe://{B}/ns/shop/sa/web"

BUNDLES = {A: "bundle.pem", B: f"bundle-{B}.pem"}
SERVER_SANS: dict[str, Any] = {"dns": ["localhost"], "ips": ["127.0.0.1"]}
# file name -> (SPIFFE ID, is a server); "client" (signer suite) and "web" (gateway suite) are
# two SVIDs of the same workload
IDENTITIES: dict[str, tuple[str, bool]] = {
    "signer": (SIGNER_ID, True),
    "gateway": (GATEWAY_ID, True),
    "upstream": (UPSTREAM_ID, True),
    "client": (CLIENT_ID, False),
    "web": (WEB_ID, False),
    "writer": (WRITER_ID, False),
    "ops": (OPS_ID, False),
    "admin": (ADMIN_ID, False),
    "minter": (MINTER_ID, False),
    "stranger": (STRANGER_ID, False),
    "b-web": (B_ID, False),
}


@dataclass
class Pki:
    dir: Path
    cas: dict[str, CertificateAuthority]

    @classmethod
    def create(cls, directory: Path) -> Pki:
        """CAs for example.org and other.org, their bundles and every SVID in IDENTITIES."""
        pki = cls(directory, {td: CertificateAuthority.create(td) for td in BUNDLES})
        for td, ca in pki.cas.items():
            pki.bundle(td).write_bytes(marshal_pem(ca.bundle()))
        for name, (spiffe_id, server) in IDENTITIES.items():
            pki.issue(spiffe_id, name, **(SERVER_SANS if server else {}))
        return pki

    def copy(self, directory: Path) -> Pki:
        """The same CAs with the files copied to ``directory`` (a test may change them there)."""
        shutil.copytree(self.dir, directory, dirs_exist_ok=True)
        return Pki(directory, self.cas)

    @property
    def ca(self) -> CertificateAuthority:
        """example.org's CA."""
        return self.cas[A]

    def bundle(self, trust_domain: str = A) -> Path:
        return self.dir / BUNDLES[trust_domain]

    def issue(self, spiffe_id: str, name: str, **kwargs: Any) -> tuple[Path, Path]:
        """A fresh SVID from its trust domain's CA, written over ``name``.crt / ``name``.key."""
        ca = self.cas[parse_spiffe_id(spiffe_id).trust_domain.name]
        return ca.issue(spiffe_id, **kwargs).write(self.dir / name)

    def files(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.crt", self.dir / f"{name}.key"

    def client_credentials(self, name: str) -> grpc.ChannelCredentials:
        """gRPC mTLS credentials presenting ``name``'s SVID, trusting example.org."""
        crt, key = self.files(name)
        return grpc.ssl_channel_credentials(
            root_certificates=self.bundle().read_bytes(),
            private_key=key.read_bytes(),
            certificate_chain=crt.read_bytes(),
        )

    def client_context(
        self, cert: Path | None, key: Path | None, *, tls13: bool = True
    ) -> ssl.SSLContext:
        """A TLS client context trusting example.org, presenting ``cert`` / ``key`` if given."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(self.bundle()))
        ctx.check_hostname = False
        if not tls13:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None and key is not None:
            ctx.load_cert_chain(str(cert), str(key))
        return ctx
