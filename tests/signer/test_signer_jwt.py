"""The JWT core: every rejection reason with a crafted token, and Sign→Verify per algorithm."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from svidgate.signer import jwt as sjwt
from svidgate.signer.errors import TokenError, UnknownKidError

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
ISS = "spiffe://example.org/signer"
SUB = "spiffe://example.org/ns/shop/sa/web"
POLICY = sjwt.VerifyPolicy(ISS, timedelta(seconds=30), timedelta(minutes=15))


def _key(alg: str) -> sjwt.PrivateKey:
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


KEYS = {alg: _key(alg) for alg in sjwt.ALGORITHMS}


def _vk(alg: str, kid: str = "k1") -> sjwt.VerificationKey:
    return sjwt.VerificationKey(kid, alg, KEYS[alg].public_key())


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(
    header: dict[str, Any] | bytes,
    payload: dict[str, Any] | bytes,
    alg: str = "ES256",
    signature: bytes | None = None,
) -> str:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    p = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    data = f"{b64(h)}.{b64(p)}".encode()
    sig = signature if signature is not None else sjwt.sign_local(alg, KEYS[alg], data)
    return f"{data.decode()}.{b64(sig)}"


def claims(**overrides: Any) -> dict[str, Any]:
    base = sjwt.build_claims(
        issuer=ISS, subject=SUB, audience=["orders"], now=NOW, ttl=timedelta(minutes=5)
    )
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def verify(token: str, *, now: datetime = NOW, alg: str = "ES256", **kw: Any) -> sjwt.VerifiedToken:
    keys = {"k1": _vk(alg)}

    def lookup(kid: str) -> sjwt.VerificationKey:
        if kid not in keys:
            raise UnknownKidError("no such key")
        return keys[kid]

    kw.setdefault("audiences", ["orders"])
    return sjwt.verify_token(token, lookup=lookup, policy=POLICY, now=now, **kw)


HDR = {"alg": "ES256", "kid": "k1", "typ": "JWT"}


@pytest.mark.parametrize("alg", sjwt.ALGORITHMS)
def test_sign_then_verify_each_algorithm(alg: str) -> None:
    data = sjwt.signing_input(alg, "k1", claims())
    token = sjwt.assemble(data, sjwt.sign_local(alg, KEYS[alg], data))
    result = verify(token, alg=alg)
    assert result.subject == SUB
    assert result.expires_at == int(NOW.timestamp()) + 300


def hs256_with_public_key() -> str:
    from cryptography.hazmat.primitives import serialization

    pem = (
        KEYS["ES256"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    h = b64(json.dumps({**HDR, "alg": "HS256"}).encode())
    p = b64(json.dumps(claims()).encode())
    mac = hmac.new(pem, f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64(mac)}"


def thumb() -> str:
    return b64(hashlib.sha256(b"leaf-der").digest())


REJECTIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("expired", craft(HDR, claims()), {"now": NOW + timedelta(minutes=5, seconds=30)}),
    (
        "not_yet_valid",
        craft(HDR, claims(iat=int(NOW.timestamp()) + 60, exp=int(NOW.timestamp()) + 120)),
        {},
    ),
    ("not_yet_valid", craft(HDR, claims(nbf=int(NOW.timestamp()) + 31)), {}),
    ("bad_signature", craft(HDR, claims(), signature=b"\x00" * 64), {}),
    (
        "bad_signature",
        craft(HDR, claims()).rsplit(".", 2)[0]
        + "."
        + b64(json.dumps(claims(sub=SUB + "x")).encode())
        + "."
        + craft(HDR, claims()).rsplit(".", 1)[1],
        {},
    ),
    ("unknown_kid", craft({**HDR, "kid": "other"}, claims()), {}),
    ("bad_audience", craft(HDR, claims(aud="payments")), {}),
    ("bad_issuer", craft(HDR, claims(iss="spiffe://evil.org/signer")), {}),
    ("bad_subject", craft(HDR, claims()), {"expected_subject": SUB + "/other"}),
    ("malformed", "abc.def", {}),
    ("malformed", "a.b.c.d", {}),
    ("malformed", craft(HDR, claims()) + "!", {}),
    ("malformed", craft(b'{"alg":"ES256","kid":"k1","kid":"k2"}', claims()), {}),
    ("malformed", craft(HDR, b'{"sub":"a","sub":"b"}'), {}),
    ("malformed", craft({**HDR, "cty": "JWT"}, claims()), {}),
    ("malformed", craft({"alg": "ES256", "typ": "JWT"}, claims()), {}),
    ("malformed", craft({**HDR, "typ": "at+jwt"}, claims()), {}),
    ("malformed", craft(HDR, b"[1,2]"), {}),
    ("malformed", craft(HDR, claims(sub="not-a-spiffe-id")), {}),
    ("malformed", craft(HDR, claims(exp=int(NOW.timestamp()) + 3600)), {}),
    ("malformed", craft(HDR, claims(exp="soon")), {}),
    *[
        ("malformed", craft(HDR, {k: v for k, v in claims().items() if k != name}), {})
        for name in ("exp", "iat", "iss", "aud", "sub")
    ],
    *[
        ("malformed", craft({**HDR, name: "x"}, claims()), {})
        for name in ("jku", "x5u", "jwk", "x5c", "crit", "zip", "b64", "x5t")
    ],
    ("alg_not_allowed", craft({**HDR, "alg": "none"}, claims(), signature=b""), {}),
    ("alg_not_allowed", craft({**HDR, "alg": "HS256"}, claims(), signature=b"x" * 32), {}),
    ("alg_not_allowed", craft({**HDR, "alg": "ES384"}, claims()), {}),
    # the classic key confusion: HS256 "signed" with the verifier's public key as HMAC secret
    ("alg_not_allowed", hs256_with_public_key(), {}),
    ("alg_not_allowed", craft({**HDR, "alg": "none"}, claims(), signature=b"x"), {}),
    ("unknown_kid", craft({**HDR, "kid": "../../../etc/passwd"}, claims()), {}),
    ("malformed", craft({**HDR, "kid": 1}, claims()), {}),
    ("malformed", craft({**HDR, "kid": ""}, claims()), {}),
    ("malformed", craft(HDR, claims(aud=[])), {}),
    ("malformed", craft(HDR, claims(aud=["orders", 7])), {}),
    ("malformed", craft(HDR, claims(iat=True)), {}),
    ("malformed", craft(HDR, claims(cnf={"jkt": "x"})), {"thumbprint": thumb()}),
    # header alg differs from the key's algorithm (EdDSA token for an ES256 key)
    ("alg_not_allowed", craft({**HDR, "alg": "EdDSA"}, claims(), alg="EdDSA"), {}),
    ("binding_mismatch", craft(HDR, claims(cnf={"x5t#S256": thumb()})), {}),
    (
        "binding_mismatch",
        craft(HDR, claims(cnf={"x5t#S256": thumb()})),
        {"thumbprint": b64(b"\x01" * 32)},
    ),
    ("binding_mismatch", craft(HDR, claims()), {"thumbprint": thumb(), "require_binding": True}),
    ("too_large", craft(HDR, claims(pad="x" * 9000)), {}),
]


@pytest.mark.parametrize(
    ("reason", "token", "kwargs"), REJECTIONS, ids=[f"{r[0]}-{i}" for i, r in enumerate(REJECTIONS)]
)
def test_rejections(reason: str, token: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(TokenError) as info:
        verify(token, **kwargs)
    assert info.value.reason == reason
    assert str(info.value).startswith(f"{reason}: ")


def test_skew_tolerance_both_ways() -> None:
    token = craft(HDR, claims())
    verify(token, now=NOW + timedelta(minutes=5, seconds=29))
    verify(craft(HDR, claims(nbf=int(NOW.timestamp()) + 29)))


def test_certificate_binding_accepted_and_audience_list() -> None:
    token = craft(HDR, claims(cnf={"x5t#S256": thumb()}, aud=["a", "orders"]))
    result = verify(token, thumbprint=thumb(), require_binding=True)
    assert result.claims["cnf"] == {"x5t#S256": thumb()}


def test_extra_claims_cannot_override_registered() -> None:
    with pytest.raises(Exception, match="registered claims"):
        sjwt.parse_extra_claims('{"sub": "spiffe://example.org/admin"}')
    with pytest.raises(Exception, match="duplicate"):
        sjwt.parse_extra_claims('{"a": 1, "a": 2}')
    assert sjwt.parse_extra_claims('{"scope": "read"}') == {"scope": "read"}


def test_key_type_must_fit_algorithm() -> None:
    sjwt.check_key_algorithm("ES256", KEYS["ES256"].public_key())
    with pytest.raises(ValueError, match="does not fit"):
        sjwt.check_key_algorithm("ES256", KEYS["EdDSA"].public_key())
    with pytest.raises(ValueError, match="does not fit"):
        sjwt.check_key_algorithm("RS256", ec.generate_private_key(ec.SECP384R1()))


def test_jwk_thumbprint_is_stable_per_key() -> None:
    pub = KEYS["ES256"].public_key()
    assert sjwt.jwk_thumbprint(pub, "ES256") == sjwt.jwk_thumbprint(pub, "ES256")
    assert sjwt.jwk_thumbprint(pub, "ES256") != sjwt.jwk_thumbprint(
        KEYS["EdDSA"].public_key(), "EdDSA"
    )
    jwk = sjwt.public_jwk("k1", "ES256", pub)
    assert jwk["kid"] == "k1" and jwk["alg"] == "ES256" and "d" not in jwk


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_fails_only_with_token_errors(text: str) -> None:
    with pytest.raises(TokenError):
        verify(text)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0), st.characters(codec="ascii"))
def test_any_single_character_change_is_rejected(position: int, char: str) -> None:
    token = craft(HDR, claims())
    index = position % len(token)
    mutated = token[:index] + char + token[index + 1 :]
    if mutated == token:
        return
    try:
        verify(mutated)
    except TokenError:
        return
    # base64url has slack bits in the last character of a part: the decoded bytes are equal
    assert [sjwt.b64url_decode(p) for p in mutated.split(".")] == [
        sjwt.b64url_decode(p) for p in token.split(".")
    ]


# -- the fast paths (ES256 without pyjwt's per-call objects, cached headers, shared decoder) --


def test_es256_interoperates_with_pyjwt_both_ways() -> None:
    import jwt as pyjwt

    key = KEYS["ES256"]
    ours = craft(HDR, claims())
    decoded = pyjwt.decode(
        ours,
        key.public_key(),
        algorithms=["ES256"],
        audience="orders",
        issuer=ISS,
        options={"verify_exp": False},  # NOW is a fixed past date
    )
    assert decoded["sub"] == SUB
    theirs = pyjwt.encode(claims(), key, algorithm="ES256", headers={"kid": "k1"})
    assert verify(theirs).subject == SUB


@pytest.mark.parametrize("length", [0, 1, 63, 65, 96, 128])
def test_es256_signature_of_wrong_length_is_bad_signature(length: int) -> None:
    good = sjwt.b64url_decode(craft(HDR, claims()).rsplit(".", 1)[1])
    signature = (good * 3)[:length]
    with pytest.raises(TokenError) as info:
        verify(craft(HDR, claims(), signature=signature))
    assert info.value.reason == "bad_signature"


def test_es256_signature_with_r_or_s_out_of_range_is_bad_signature() -> None:
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256 order
    good = sjwt.b64url_decode(craft(HDR, claims()).rsplit(".", 1)[1])
    for signature in (n.to_bytes(32, "big") + good[32:], good[:32] + b"\xff" * 32):
        with pytest.raises(TokenError) as info:
            verify(craft(HDR, claims(), signature=signature))
        assert info.value.reason == "bad_signature"


def test_a_refused_header_is_refused_every_time() -> None:
    bad = craft({**HDR, "jku": "https://evil.example/keys"}, claims())
    good = craft(HDR, claims())
    for _ in range(3):
        with pytest.raises(TokenError) as info:
            verify(bad)
        assert info.value.reason == "malformed"
        assert verify(good).subject == SUB


def test_parsed_header_is_a_private_copy() -> None:
    token = craft(HDR, claims())
    first = sjwt.parse_token(token)
    first.header["kid"] = "changed"
    assert sjwt.parse_token(token).header == HDR


REFUSED = None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"a":1}', {"a": 1}),
        (b'\xef\xbb\xbf{"a":1}', {"a": 1}),  # UTF-8 BOM: json.loads accepts it in bytes
        ('{"a":1}'.encode("utf-16"), {"a": 1}),  # json.loads detects UTF-16/32 in bytes
        ('{"a":"\u00e9"}'.encode("utf-16-le"), {"a": "\u00e9"}),
        ('\ufeff{"a":1}', REFUSED),  # ...and refuses a BOM in text
        ("{}", {}),
        (b'{"a":1,"a":2}', REFUSED),  # duplicates: json.loads keeps the last, we refuse
        (b"\xff\xfe\x00", REFUSED),
        (b"[1]", REFUSED),
    ],
)
def test_parse_json_object_decides_like_json_loads(data: bytes | str, expected: Any) -> None:
    if expected is not REFUSED:
        assert json.loads(data) == expected
        assert sjwt.parse_json_object(data, "payload") == expected
        return
    with pytest.raises(TokenError) as info:
        sjwt.parse_json_object(data, "payload")
    assert info.value.reason == "malformed"
