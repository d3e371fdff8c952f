"""`svidgate pki init | issue | inspect`, run as the real installed command."""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from svidgate.pki.bundle import load_bundle
from svidgate.pki.svid import load_certificates, thumbprint_sha256, x5t_s256

from svidgate.cli import main

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "pki"
ID = "spiffe://example.org/ns/a/sa/b"


def _svidgate() -> str:
    beside = Path(sys.executable).with_name("svidgate")
    found = str(beside) if beside.exists() else shutil.which("svidgate")
    assert found, "the svidgate console script is not installed (pip install -e .)"
    return found


SVIDGATE = _svidgate()
OPENSSL = shutil.which("openssl")


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SVIDGATE, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def ok(*args: str | Path) -> str:
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout


def assert_user_error(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    """Exit 2 and exactly one line on stderr that names the problem; no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("svidgate"), lines[0]
    assert fragment in lines[0], lines[0]


def openssl(*args: str | Path) -> str:
    assert OPENSSL, "openssl is needed for these tests"
    proc = subprocess.run(
        [OPENSSL, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _fields(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


@pytest.mark.parametrize("intermediate", [False, True], ids=["root", "intermediate"])
@pytest.mark.parametrize("key_type", ["ec-p256", "ed25519", "rsa-2048"])
def test_init_issue_and_openssl_verify(tmp_path: Path, key_type: str, intermediate: bool) -> None:
    d = tmp_path / "ca"
    init: list[str | Path] = [
        "pki",
        "init",
        "--trust-domain",
        "example.org",
        "--dir",
        d,
        "--key-type",
        key_type,
    ]
    out = ok(*init, *(["--intermediate"] if intermediate else []))
    files = {"root.crt", "root.key", "bundle.pem", "bundle.json"}
    if intermediate:
        files |= {"intermediate.crt", "intermediate.key"}
    assert {p.name for p in d.iterdir()} == files
    for name in files:
        assert f"wrote {d / name}" in out
        assert _mode(d / name) == (0o600 if name.endswith(".key") else 0o644), name
    assert "PRIVATE KEY" not in out
    assert load_bundle(d / "bundle.json", "example.org").x509_authorities == tuple(
        load_certificates(d / "root.crt")
    )

    issue: list[str | Path] = [
        "pki",
        "issue",
        "--dir",
        d,
        "--spiffe-id",
        ID,
        "--out",
        d / "b",
        "--dns",
        "localhost",
    ]
    out = ok(*issue, "--ip", "127.0.0.1", "--key-type", key_type, "--ttl", "15m")
    assert f"wrote {d / 'b.crt'}" in out and f"wrote {d / 'b.key'}" in out
    assert "PRIVATE KEY" not in out
    assert _mode(d / "b.key") == 0o600
    chain = load_certificates(d / "b.crt")
    assert len(chain) == (2 if intermediate else 1)

    (d / "leaf.pem").write_bytes((d / "b.crt").read_bytes().split(b"-----END CERTIFICATE-----")[0])
    with (d / "leaf.pem").open("a") as f:
        f.write("-----END CERTIFICATE-----\n")
    untrusted: list[str | Path] = ["-untrusted", d / "intermediate.crt"] if intermediate else []
    assert openssl("verify", "-CAfile", d / "root.crt", *untrusted, d / "leaf.pem").strip() == (
        f"{d / 'leaf.pem'}: OK"
    )
    # the chain file as written (leaf + intermediates) verifies as one -untrusted bundle too
    assert openssl("verify", "-CAfile", d / "root.crt", "-untrusted", d / "b.crt", d / "b.crt")
    text = openssl("x509", "-in", d / "b.crt", "-noout", "-text")
    assert text.count("URI:") == 1
    assert f"URI:{ID}" in text
    assert "CA:FALSE" in text
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    # the key really belongs to the certificate
    cert_pub = openssl("x509", "-in", d / "b.crt", "-noout", "-pubkey")
    key_pub = openssl("pkey", "-in", d / "b.key", "-pubout")
    assert cert_pub == key_pub


def test_done_when_scenario_of_issue_2(tmp_path: Path) -> None:
    d = tmp_path / "d"
    ok("pki", "init", "--trust-domain", "example.org", "--dir", d)
    ok("pki", "issue", "--dir", d, "--spiffe-id", ID, "--out", d / "b", "--dns", "localhost")
    assert openssl("verify", "-CAfile", d / "root.crt", d / "b.crt").strip().endswith(": OK")
    text = openssl("x509", "-in", d / "b.crt", "-noout", "-text")
    assert text.count("URI:") == 1 and "CA:FALSE" in text
    assert _mode(d / "b.key") == 0o600 and _mode(d / "root.key") == 0o600


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    ok("pki", "init", "--trust-domain", "example.org", "--dir", d)
    before = (d / "root.crt").read_bytes()
    proc = run("pki", "init", "--trust-domain", "example.org", "--dir", d)
    assert_user_error(proc, "refusing to overwrite a CA (use --force)")
    assert (d / "root.crt").read_bytes() == before
    ok("pki", "init", "--trust-domain", "example.org", "--dir", d, "--force")
    assert (d / "root.crt").read_bytes() != before


def test_init_force_without_intermediate_drops_the_old_one(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    ok("pki", "init", "--trust-domain", "example.org", "--dir", d, "--intermediate")
    ok("pki", "init", "--trust-domain", "example.org", "--dir", d, "--force")
    ok("pki", "issue", "--dir", d, "--spiffe-id", ID, "--out", d / "b")
    assert not (d / "intermediate.crt").exists()
    assert openssl("verify", "-CAfile", d / "root.crt", d / "b.crt").strip().endswith(": OK")


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli") / "ca"
    ok("pki", "init", "--trust-domain", "example.org", "--dir", d, "--intermediate")
    ok("pki", "issue", "--dir", d, "--spiffe-id", ID, "--out", d / "b", "--dns", "localhost")
    return d


def test_inspect_an_issued_svid(ca_dir: Path) -> None:
    out = ok("pki", "inspect", ca_dir / "b.crt")
    fields = _fields(out)
    leaf = load_certificates(ca_dir / "b.crt")[0]
    assert fields["spiffe_id"] == ID
    assert fields["kind"] == "leaf certificate"
    assert fields["uri_sans"] == ID
    assert fields["dns_sans"] == "localhost"
    assert "svidgate intermediate CA example.org" in fields["issuer"]
    assert fields["sha256"] == thumbprint_sha256(leaf).hex()
    assert fields["x5t#S256"] == x5t_s256(leaf)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", fields["not_before"])
    assert fields["not_after"].endswith("(valid)")
    assert fields["chain"].startswith("2 certificate(s)")
    assert fields["svid_checks"] == "ok"
    assert "chain_check" not in fields
    openssl_fp = openssl("x509", "-in", ca_dir / "b.crt", "-noout", "-fingerprint", "-sha256")
    assert openssl_fp.split("=", 1)[1].strip().replace(":", "").lower() == fields["sha256"]


def test_inspect_with_bundle_checks_the_chain(ca_dir: Path, tmp_path: Path) -> None:
    fields = _fields(ok("pki", "inspect", ca_dir / "b.crt", "--bundle", ca_dir / "bundle.json"))
    assert fields["chain_check"].startswith("ok")
    other = tmp_path / "other"
    ok("pki", "init", "--trust-domain", "example.org", "--dir", other)
    proc = run("pki", "inspect", ca_dir / "b.crt", "--bundle", other / "bundle.pem")
    assert proc.returncode == 1
    assert "chain_check: FAIL:" in proc.stdout and "does not chain" in proc.stdout


def test_inspect_bundle_trust_domain_can_be_given(ca_dir: Path) -> None:
    args: list[str | Path] = ["pki", "inspect", ca_dir / "b.crt", "--bundle", ca_dir / "bundle.pem"]
    assert _fields(ok(*args, "--trust-domain", "example.org"))["chain_check"].startswith("ok")
    proc = run(*args, "--trust-domain", "other.org")
    assert proc.returncode == 1
    assert "no trust bundle for trust domain example.org" in _fields(proc.stdout)["chain_check"]


def test_inspect_a_ca_certificate(ca_dir: Path) -> None:
    fields = _fields(ok("pki", "inspect", ca_dir / "root.crt"))
    assert fields["kind"] == "CA certificate"
    assert fields["svid_checks"].startswith("skipped")


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("wrong-leaf-ca-true.pem", "leaf certificate is a CA"),
        ("two-uri-sans.pem", "has 2 URI SANs"),
        ("no-uri-san.pem", "no URI SAN"),
        ("uri-san-not-spiffe.pem", "scheme must be 'spiffe://'"),
        ("uri-san-trust-domain-only.pem", "needs a path"),
        ("uppercase-trust-domain.pem", "must be lowercase"),
        ("leaf-key-cert-sign.pem", "keyCertSign"),
        ("leaf-crl-sign.pem", "cRLSign"),
        ("no-digital-signature.pem", "digitalSignature"),
    ],
)
def test_inspect_exits_1_for_a_broken_vector(name: str, fragment: str) -> None:
    proc = run("pki", "inspect", VECTORS / name)
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr == ""
    checks = _fields(proc.stdout)["svid_checks"]
    assert checks.startswith("FAIL:") and fragment in checks


@pytest.mark.parametrize(
    ("name", "bundle", "fragment"),
    [
        ("expired.pem", "bundle-example.org.pem", "expired at 2022-01-01"),
        ("not-yet-valid.pem", "bundle-example.org.pem", "not valid before 2090-01-01"),
        ("intermediate-not-ca.pem", "bundle-example.org.pem", "does not chain"),
        ("untrusted-ca.pem", "bundle-example.org.pem", "does not chain"),
        ("other-trust-domain.pem", "bundle-other.org.pem", "does not chain"),
        # example.org's bundle is not other.org's, whatever the leaf claims:
        ("other-trust-domain.pem", "bundle-example.org.pem", "no trust bundle for trust domain"),
        ("intermediate-not-ca-ed25519.pem", "bundle-example.org-ed25519.pem", "not a CA"),
    ],
)
def test_inspect_with_bundle_exits_1_for_chain_defects(
    name: str, bundle: str, fragment: str
) -> None:
    proc = run("pki", "inspect", VECTORS / name, "--bundle", VECTORS / bundle)
    assert proc.returncode == 1, proc.stdout
    checks = _fields(proc.stdout)["chain_check"]
    assert checks.startswith("FAIL:") and fragment in checks


def test_inspect_shows_validity_status() -> None:
    fields = _fields(ok("pki", "inspect", VECTORS / "expired.pem"))
    assert fields["not_after"] == "2022-01-01T00:00:00Z (EXPIRED)"
    fields = _fields(ok("pki", "inspect", VECTORS / "not-yet-valid.pem"))
    assert fields["not_after"] == "2091-01-01T00:00:00Z (not yet valid)"


def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole table through the real dispatcher (`svidgate.cli.main`) in this process, and
    every fifth case also as a real `svidgate` process (exit status, no traceback)."""
    (tmp_path / "plain").write_text("not a certificate\n")
    (tmp_path / "unreadable" / "root.crt").mkdir(parents=True)  # EISDIR, even for root
    d = tmp_path / "new"
    init: list[str | Path] = ["pki", "init", "--trust-domain", "example.org", "--dir"]
    issue: list[str | Path] = [
        "pki",
        "issue",
        "--dir",
        ca_dir,
        "--out",
        tmp_path / "x",
        "--spiffe-id",
    ]
    cases: list[tuple[list[str | Path], str]] = [
        ([*issue, "spiffe://example.org/a/../b"], "'..' segment"),
        ([*issue, "spiffe://Example.org/a"], "must be lowercase"),
        ([*issue, "spiffe://example.org"], "needs a path"),
        ([*issue, "https://example.org/a"], "scheme must be 'spiffe://'"),
        ([*issue, "spiffe://other.org/a"], "not in this CA's trust domain example.org"),
        ([*issue, ID, "--ttl", "10 minutes"], "'10 minutes' is not a duration"),
        ([*issue, ID, "--ttl", "0s"], "SVID TTL must be positive"),
        ([*issue, ID, "--ip", "localhost"], "invalid IP address 'localhost'"),
        ([*issue, ID, "--dns", "exämple.org"], "invalid DNS name 'exämple.org'"),
        ([*issue, ID, "--key-type", "dsa"], "invalid choice: 'dsa'"),
        ([*init, d, "--ttl", "1y"], "'1y' is not a duration"),
        ([*init, d, "--ttl", "99999999999999999999h"], "too large a duration"),
        ([*init, d, "--ttl", "100000000h"], "CA TTL 100000000h is too long"),
        ([*init, d, "--key-type", "rsa-1024"], "invalid choice: 'rsa-1024'"),
        (["pki", "init", "--trust-domain", "Example.org", "--dir", d], "must be lowercase"),
        (["pki", "init", "--trust-domain", "example.org:443", "--dir", d], "port"),
        ([*init, tmp_path / "plain" / "sub"], "cannot create directory"),
        (["pki", "init", "--dir", d], "required: --trust-domain"),
        (
            ["pki", "issue", "--dir", tmp_path / "nope", "--spiffe-id", ID, "--out", d / "x"],
            "cannot read certificate file",
        ),
        (
            ["pki", "issue", "--dir", tmp_path / "plain", "--spiffe-id", ID, "--out", d / "x"],
            "cannot read certificate file",
        ),
        (
            ["pki", "issue", "--dir", tmp_path / "unreadable", "--spiffe-id", ID, "--out", d],
            "cannot read certificate file",
        ),
        (
            ["pki", "issue", "--dir", ca_dir, "--spiffe-id", ID, "--out", tmp_path / "no/x"],
            "cannot write",
        ),
        (["pki", "inspect", tmp_path / "missing.pem"], "cannot read certificate file"),
        (["pki", "inspect", tmp_path / "plain"], "not PEM certificates"),
        (["pki", "inspect", ca_dir / "b.key"], "not PEM certificates"),
        (["pki", "inspect", ca_dir], "cannot read certificate file"),
        (
            ["pki", "inspect", ca_dir / "b.crt", "--bundle", tmp_path / "plain"],
            "not valid PEM certificates",
        ),
        (["pki", "inspect", ca_dir / "b.crt", "--bundle", tmp_path / "nope"], "cannot read"),
        (
            ["pki", "inspect", ca_dir / "b.crt", "--bundle", VECTORS / "no-uri-san.pem"],
            "cannot tell which trust domain bundle",
        ),
        (["pki", "frobnicate"], "invalid choice: 'frobnicate'"),
    ]
    for args, fragment in cases:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        result = subprocess.CompletedProcess(args, code, captured.out, captured.err)
        assert_user_error(result, fragment)
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(lambda case: run(*case[0]), cases[::5]))
    for (_, fragment), proc in zip(cases[::5], procs, strict=True):
        assert_user_error(proc, fragment)
    assert not d.exists()  # nothing was created by a refused init


def test_errors_never_show_key_material(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    ok("pki", "init", "--trust-domain", "example.org", "--dir", d)
    secret = (d / "root.key").read_text()
    (d / "root.key").write_text(secret.replace("A", "B", 3))  # corrupt but still PEM-shaped
    proc = run("pki", "issue", "--dir", d, "--spiffe-id", ID, "--out", d / "x")
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1
    body = "".join(secret.splitlines()[1:-1])
    for chunk in (body[i : i + 16] for i in range(0, len(body), 16)):
        assert chunk not in proc.stderr + proc.stdout


def test_bundle_json_written_by_init_is_spiffe_format(ca_dir: Path) -> None:
    doc = json.loads((ca_dir / "bundle.json").read_text())
    assert [k["use"] for k in doc["keys"]] == ["x509-svid"]
    assert isinstance(doc.get("spiffe_sequence"), int)
