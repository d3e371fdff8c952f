"""pki.jwt_svid: the one JWT-SVID verifier (signer Verify and gateway local mode). Every
rejection reason with a crafted token, the order of the checks, lifetime, NumericDates, nesting,
binding; moved here from the signer's and the gateway's former verifiers, assertions intact."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from support.jwt_keys import NOW as GNOW
from support.jwt_keys import Signer
from svidgate.pki.errors import PkiError
from svidgate.pki.jose import ALGORITHMS, b64url_decode, jws_algorithm
from svidgate.pki.jwt_svid import (
    MAX_TOKEN_BYTES,
    REASONS,
    BadSubjectError,
    JwtSvidError,
    UnknownKidError,
    VerificationKey,
    VerificationPolicy,
    VerifiedToken,
    check_binding,
    parse_json_object,
    parse_token,
    precheck,
    verify_jwt_svid,
)

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
ISS = "spiffe://example.org/signer"
SUB = "spiffe://example.org/ns/shop/sa/web"
AUD = "orders"
SKEW = timedelta(seconds=30)
MAX_TTL = timedelta(minutes=15)
POLICY = VerificationPolicy(ISS, SKEW, MAX_TTL)


def _key(alg: str) -> Any:
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


KEYS = {alg: _key(alg) for alg in ALGORITHMS}


def _vk(alg: str, kid: str = "k1") -> VerificationKey:
    return VerificationKey(kid, alg, KEYS[alg].public_key())


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
    sig = signature if signature is not None else jws_algorithm(alg).sign(data, KEYS[alg])
    return f"{data.decode()}.{b64(sig)}"


def claims(**overrides: Any) -> dict[str, Any]:
    iat = int(NOW.timestamp())
    base: dict[str, Any] = {
        "iss": ISS,
        "sub": SUB,
        "aud": AUD,
        "iat": iat,
        "exp": iat + 300,
        "jti": b64(secrets.token_bytes(16)),
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def raw_payload(base: dict[str, Any], **raw: str) -> bytes:
    """``base`` as JSON plus members whose values are raw JSON text (NaN, 1e400, ...)."""
    text = json.dumps({k: v for k, v in base.items() if k not in raw})
    return (text[:-1] + "".join(f', "{k}": {v}' for k, v in raw.items()) + "}").encode()


def verify(
    token: str,
    *,
    now: datetime = NOW,
    alg: str = "ES256",
    policy: VerificationPolicy = POLICY,
    **kw: Any,
) -> VerifiedToken:
    keys = {"k1": _vk(alg)}

    def lookup(kid: str) -> VerificationKey:
        if kid not in keys:
            raise UnknownKidError("no such key")
        return keys[kid]

    kw.setdefault("audiences", [AUD])
    return verify_jwt_svid(token, lookup=lookup, policy=policy, now=now, **kw)


def reason_of(token: str, **kw: Any) -> str:
    with pytest.raises(JwtSvidError) as info:
        verify(token, **kw)
    return info.value.reason


HDR = {"alg": "ES256", "kid": "k1", "typ": "JWT"}


def thumb() -> str:
    return b64(hashlib.sha256(b"leaf-der").digest())


def hs256_with_public_key() -> str:
    pem = (
        KEYS["ES256"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    h = b64(json.dumps({**HDR, "alg": "HS256"}).encode())
    p = b64(json.dumps(claims()).encode())
    mac = hmac.new(pem, f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64(mac)}"


# ---------------------------------------------------------------------------------------------
# The error tree


def test_errors_carry_the_reason_codes_and_are_pki_errors() -> None:
    assert {
        "expired",
        "not_yet_valid",
        "bad_signature",
        "unknown_kid",
        "bad_audience",
        "bad_issuer",
        "bad_subject",
        "malformed",
        "alg_not_allowed",
        "binding_mismatch",
        "too_large",
    } == REASONS
    err = BadSubjectError("sub is not the expected subject")
    assert isinstance(err, JwtSvidError) and isinstance(err, PkiError)
    assert (err.reason, err.detail) == ("bad_subject", "sub is not the expected subject")
    assert str(err) == "bad_subject: sub is not the expected subject"


# ---------------------------------------------------------------------------------------------
# Every reason with a crafted token (from the signer's verifier tests)


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
    ("malformed", craft(HDR, claims(cnf={"jkt": "x"})), {"certificate_thumbprint": thumb()}),
    # header alg differs from the key's algorithm (EdDSA token for an ES256 key)
    ("alg_not_allowed", craft({**HDR, "alg": "EdDSA"}, claims(), alg="EdDSA"), {}),
    ("binding_mismatch", craft(HDR, claims(cnf={"x5t#S256": thumb()})), {}),
    (
        "binding_mismatch",
        craft(HDR, claims(cnf={"x5t#S256": thumb()})),
        {"certificate_thumbprint": b64(b"\x01" * 32)},
    ),
    (
        "binding_mismatch",
        craft(HDR, claims()),
        {"certificate_thumbprint": thumb(), "require_binding": True},
    ),
    ("too_large", craft(HDR, claims(pad="x" * 9000)), {}),
]


@pytest.mark.parametrize(
    ("reason", "token", "kwargs"), REJECTIONS, ids=[f"{r[0]}-{i}" for i, r in enumerate(REJECTIONS)]
)
def test_rejections(reason: str, token: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(JwtSvidError) as info:
        verify(token, **kwargs)
    assert info.value.reason == reason
    assert str(info.value).startswith(f"{reason}: ")


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_each_algorithm_verifies(alg: str) -> None:
    result = verify(craft({**HDR, "alg": alg}, claims(), alg=alg), alg=alg)
    assert result.subject == SUB and result.kid == "k1"
    assert result.expires_at == int(NOW.timestamp()) + 300


def test_skew_tolerance_both_ways() -> None:
    token = craft(HDR, claims())
    verify(token, now=NOW + timedelta(minutes=5, seconds=29))
    verify(craft(HDR, claims(nbf=int(NOW.timestamp()) + 29)))


def test_certificate_binding_accepted_and_audience_list() -> None:
    token = craft(HDR, claims(cnf={"x5t#S256": thumb()}, aud=["a", "orders"]))
    result = verify(token, certificate_thumbprint=thumb(), require_binding=True)
    assert result.claims["cnf"] == {"x5t#S256": thumb()}


def test_expected_audiences_are_required() -> None:
    with pytest.raises(ValueError, match="audience"):
        verify(craft(HDR, claims()), audiences=[])


def test_policy_refuses_nonsense() -> None:
    for args in (("", SKEW, MAX_TTL), (ISS, -SKEW, MAX_TTL), (ISS, SKEW, timedelta(0))):
        with pytest.raises(ValueError):
            VerificationPolicy(*args)


# ---------------------------------------------------------------------------------------------
# Lifetime (tokens.max_ttl), NumericDates, nesting


def test_lifetime_up_to_max_ttl_and_no_skew_on_top() -> None:
    iat = int(NOW.timestamp()) - 60
    limit = int(MAX_TTL.total_seconds())
    assert verify(craft(HDR, claims(iat=iat, exp=iat + limit))).subject == SUB
    assert reason_of(craft(HDR, claims(iat=iat, exp=iat + limit + 1))) == "malformed"
    # the skew is about clocks, not lifetimes: a long skew does not stretch max_ttl
    wide = VerificationPolicy(ISS, timedelta(minutes=10), MAX_TTL)
    assert reason_of(craft(HDR, claims(iat=iat, exp=iat + limit + 1)), policy=wide) == "malformed"
    short = VerificationPolicy(ISS, SKEW, timedelta(minutes=1))
    assert verify(craft(HDR, claims())).subject == SUB  # 300 s: fine under 15m, not under 1m
    assert reason_of(craft(HDR, claims()), policy=short) == "malformed"


@pytest.mark.parametrize(
    "raw",
    [
        {"exp": "NaN"},
        {"exp": "Infinity"},
        {"iat": "-Infinity"},
        {"nbf": "NaN"},
        {"exp": "1e400"},
        {"exp": "9" * 400},
        {"exp": "-1"},
        {"exp": "253402300800"},
        {"exp": "true"},
        {"iat": "null"},
        {"score": "NaN"},
        {"score": "-Infinity"},
    ],
)
def test_numbers_that_are_no_numeric_dates_are_malformed(raw: dict[str, str]) -> None:
    assert reason_of(craft(HDR, raw_payload(claims(), **raw))) == "malformed"


def test_float_numeric_dates_are_accepted() -> None:
    iat = NOW.timestamp() - 0.5
    assert verify(craft(HDR, claims(iat=iat, exp=iat + 60.25))).expires_at == int(iat + 60.25)


def test_deep_nesting_is_malformed_never_a_recursion_error() -> None:
    for depth in (65, 990, 2800):
        nest = "[" * depth + "]" * depth
        header = json.dumps(HDR)[:-1].encode() + f', "x": {nest}}}'.encode()
        assert reason_of(craft(header, claims())) == "malformed", depth
        assert reason_of(craft(HDR, raw_payload(claims(), x=nest))) == "malformed", depth
    ok = "[" * 63 + "]" * 63  # 64 levels with the payload object itself
    assert verify(craft(HDR, raw_payload(claims(), x=ok))).claims["x"] is not None
    with pytest.raises(JwtSvidError) as info:
        parse_json_object("[" * 100_000, "payload")
    assert info.value.reason == "malformed"


# ---------------------------------------------------------------------------------------------
# Binding


def test_binding_rules() -> None:
    bound = {"sub": SUB, "cnf": {"x5t#S256": thumb()}}
    check_binding(bound, expected_subject=SUB, certificate_thumbprint=thumb(), require_binding=True)
    check_binding(
        {"sub": SUB}, expected_subject=None, certificate_thumbprint=None, require_binding=False
    )
    cases: list[tuple[dict[str, Any], dict[str, Any], str]] = [
        (bound, {"expected_subject": SUB + "x"}, "bad_subject"),
        ({"cnf": {}}, {"expected_subject": SUB}, "bad_subject"),  # sub missing
        ({"sub": 7}, {"expected_subject": SUB}, "bad_subject"),
        (bound, {}, "binding_mismatch"),
        (bound, {"certificate_thumbprint": b64(b"\x02" * 32)}, "binding_mismatch"),
        ({"sub": SUB}, {"require_binding": True}, "binding_mismatch"),
        ({"sub": SUB, "cnf": None}, {"certificate_thumbprint": thumb()}, "malformed"),
        ({"sub": SUB, "cnf": "x"}, {"certificate_thumbprint": thumb()}, "malformed"),
        ({"sub": SUB, "cnf": {"x5t#S256": ""}}, {"certificate_thumbprint": thumb()}, "malformed"),
        # lone surrogates and non-ASCII compare, never crash
        ({"sub": "spiffe://example.org/\ud800"}, {"expected_subject": SUB}, "bad_subject"),
        ({"cnf": {"x5t#S256": "\ud800é"}}, {"certificate_thumbprint": thumb()}, "binding_mismatch"),
    ]
    defaults = {"expected_subject": None, "certificate_thumbprint": None, "require_binding": False}
    for claim_set, kwargs, reason in cases:
        with pytest.raises(JwtSvidError) as info:
            check_binding(claim_set, **{**defaults, **kwargs})
        assert info.value.reason == reason, (claim_set, kwargs)


# ---------------------------------------------------------------------------------------------
# Robustness and the fast paths


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_fails_only_with_token_errors(text: str) -> None:
    with pytest.raises(JwtSvidError):
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
    except JwtSvidError:
        return
    # base64url has slack bits in the last character of a part: the decoded bytes are equal
    assert [b64url_decode(p) for p in mutated.split(".")] == [
        b64url_decode(p) for p in token.split(".")
    ]


@pytest.mark.parametrize("length", [0, 1, 63, 65, 96, 128])
def test_es256_signature_of_wrong_length_is_bad_signature(length: int) -> None:
    good = b64url_decode(craft(HDR, claims()).rsplit(".", 1)[1])
    signature = (good * 3)[:length]
    with pytest.raises(JwtSvidError) as info:
        verify(craft(HDR, claims(), signature=signature))
    assert info.value.reason == "bad_signature"


def test_es256_signature_with_r_or_s_out_of_range_is_bad_signature() -> None:
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256 order
    good = b64url_decode(craft(HDR, claims()).rsplit(".", 1)[1])
    for signature in (n.to_bytes(32, "big") + good[32:], good[:32] + b"\xff" * 32):
        with pytest.raises(JwtSvidError) as info:
            verify(craft(HDR, claims(), signature=signature))
        assert info.value.reason == "bad_signature"


def test_a_refused_header_is_refused_every_time() -> None:
    bad = craft({**HDR, "jku": "https://evil.example/keys"}, claims())
    good = craft(HDR, claims())
    for _ in range(3):
        with pytest.raises(JwtSvidError) as info:
            verify(bad)
        assert info.value.reason == "malformed"
        assert verify(good).subject == SUB


def test_parsed_header_is_a_private_copy() -> None:
    token = craft(HDR, claims())
    first = parse_token(token)
    first.header["kid"] = "changed"
    assert parse_token(token).header == HDR


def test_precheck_size_and_shape() -> None:
    with pytest.raises(JwtSvidError) as info:
        precheck("a" * (MAX_TOKEN_BYTES + 1))
    assert info.value.reason == "too_large"
    with pytest.raises(JwtSvidError) as info:
        precheck("é" * (MAX_TOKEN_BYTES // 2 + 1))  # counted in UTF-8 bytes
    assert info.value.reason == "too_large"
    for junk in ("a.b", "a.b.c.d"):
        with pytest.raises(JwtSvidError) as info:
            precheck(junk)
        assert info.value.reason == "malformed"
    precheck("a.b.c")


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
        (b'{"a":NaN}', REFUSED),  # json.loads accepts NaN / Infinity, we refuse
        (b'{"a":-Infinity}', REFUSED),
    ],
)
def test_parse_json_object_decides_like_json_loads(data: bytes | str, expected: Any) -> None:
    if expected is not REFUSED:
        assert json.loads(data) == expected
        assert parse_json_object(data, "payload") == expected
        return
    with pytest.raises(JwtSvidError) as info:
        parse_json_object(data, "payload")
    assert info.value.reason == "malformed"


# ---------------------------------------------------------------------------------------------
# From the gateway's former local verifier: tokens minted by pyjwt, float ``now``


def local(
    token: str,
    *signers: Signer,
    audience: str = AUD,
    now: float = GNOW,
    issuer: str = ISS,
    clock_skew: timedelta = SKEW,
    expected_subject: str | None = None,
    certificate_thumbprint: str | None = None,
    require_binding: bool | None = None,
) -> VerifiedToken:
    """The core as the gateway calls it (``require_binding`` defaults to: a thumbprint given)."""
    keys = {s.kid: s.key for s in signers}

    def lookup(kid: str) -> VerificationKey:
        if kid not in keys:
            raise UnknownKidError("no such key")
        return keys[kid]

    return verify_jwt_svid(
        token,
        lookup=lookup,
        policy=VerificationPolicy(issuer, clock_skew, MAX_TTL),
        audiences=(audience,),
        now=datetime.fromtimestamp(now, UTC),
        expected_subject=expected_subject,
        certificate_thumbprint=certificate_thumbprint,
        require_binding=bool(certificate_thumbprint)
        if require_binding is None
        else require_binding,
    )


def reject(token: str, *signers: Signer, **kwargs: Any) -> str:
    with pytest.raises(JwtSvidError) as info:
        local(token, *signers, **kwargs)
    return info.value.reason


@pytest.fixture(scope="module")
def es() -> Signer:
    return Signer("k1")


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "RS256"])
def test_valid_token_verifies(alg: str) -> None:
    s = Signer("k-" + alg, alg)
    got = local(s.token(), s)
    assert got == VerifiedToken(
        subject=SUB, claims=got.claims, kid=s.kid, expires_at=int(GNOW) + 300
    )
    assert got.claims["aud"] == AUD
    with pytest.raises(TypeError):
        got.claims["sub"] = "x"  # type: ignore[index]


def test_audience_list_and_expected_subject(es: Signer) -> None:
    token = es.token(aud=["billing", AUD])
    got = local(token, es, expected_subject=SUB)
    assert got.subject == SUB
    assert reject(token, es, audience="nope") == "bad_audience"
    assert reject(token, es, expected_subject=SUB + "x") == "bad_subject"


def test_time_checks_with_clock_skew(es: Signer) -> None:
    skew = timedelta(seconds=30)
    # expired 10 s ago: inside the skew; 31 s ago: outside
    old = int(GNOW) - 100
    local(es.token(iat=old, exp=int(GNOW) - 10), es, clock_skew=skew)
    assert reject(es.token(iat=old, exp=int(GNOW) - 31), es, clock_skew=skew) == "expired"
    assert reject(es.token(iat=int(GNOW) + 31), es, clock_skew=skew) == "not_yet_valid"
    assert reject(es.token(iat=int(GNOW) + 20), es, clock_skew=timedelta(0)) == "not_yet_valid"
    assert reject(es.token(iat=int(GNOW), exp=int(GNOW)), es) == "malformed"  # exp <= iat
    assert reject(es.token(nbf=int(GNOW) + 31), es, clock_skew=skew) == "not_yet_valid"
    local(es.token(nbf=int(GNOW) + 20), es, clock_skew=skew)
    assert reject(es.token(exp="soon"), es) == "malformed"
    assert reject(es.token(exp=True), es) == "malformed"


@pytest.mark.parametrize("claim", ["iss", "sub", "aud", "exp", "iat"])
def test_required_claims(es: Signer, claim: str) -> None:
    assert reject(es.token(**{claim: None}), es) == "malformed"


def test_issuer(es: Signer) -> None:
    other = es.token(iss="spiffe://example.org/other")
    assert reject(other, es, issuer=ISS) == "bad_issuer"
    assert reject(es.token(), es, issuer=ISS + "x") == "bad_issuer"
    local(es.token(), es, issuer=ISS)


def test_signature_and_kid(es: Signer) -> None:
    impostor = Signer("k1")  # same kid, different key
    assert reject(impostor.token(), es) == "bad_signature"
    assert reject(Signer("k9").token(), es) == "unknown_kid"
    unsigned = ".".join(
        b64(part)
        for part in (json.dumps({"alg": "ES256"}).encode(), json.dumps({"sub": SUB}).encode(), b"x")
    )
    assert reject(unsigned, es) == "malformed"  # kid is required
    head, _, sig = es.token().split(".")
    body = b64(
        json.dumps(
            {
                "iss": ISS,
                "sub": "spiffe://example.org/admin",
                "aud": AUD,
                "iat": int(GNOW),
                "exp": int(GNOW) + 60,
            }
        ).encode()
    )
    assert reject(f"{head}.{body}.{sig}", es) == "bad_signature"


def test_algorithm_comes_from_the_key(es: Signer) -> None:
    claim_set = {"iss": ISS, "sub": SUB, "aud": AUD, "iat": int(GNOW), "exp": int(GNOW) + 60}
    none = f"{b64(json.dumps({'alg': 'none', 'kid': 'k1'}).encode())}"
    none += f".{b64(json.dumps(claim_set).encode())}.{b64(b'')}"
    assert reject(none, es) == "alg_not_allowed"
    # HS256 signed with the public JWK as the secret (algorithm confusion)
    secret = json.dumps(es.jwk).encode()
    head = b64(json.dumps({"alg": "HS256", "kid": "k1"}).encode())
    body = b64(json.dumps(claim_set).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    assert reject(f"{head}.{body}.{b64(mac)}", es) == "alg_not_allowed"
    # a real RS256 signature presented under the ES256 key's kid
    rs = Signer("k1", "RS256")
    assert reject(rs.token(), es) == "alg_not_allowed"


@pytest.mark.parametrize("header", ["jku", "x5u", "jwk", "x5c", "crit", "zip", "cty", "x-extra"])
def test_key_selecting_headers_are_refused(es: Signer, header: str) -> None:
    value: Any = ["exp"] if header == "crit" else "https://evil.example/x"
    if header == "jwk":
        value = es.jwk
    assert reject(es.token(headers={header: value}), es) == "malformed"


def test_header_and_payload_strictness(es: Signer) -> None:
    assert reject(es.token(headers={"typ": "JOSE+JSON"}), es) == "malformed"
    local(es.token(headers={"typ": "jwt"}), es)
    assert reject(es.token(sub="web"), es) == "malformed"  # not a SPIFFE ID
    assert reject(es.token(sub="spiffe://example.org"), es) == "malformed"  # no path
    assert reject(es.token(aud=[]), es) == "malformed"
    assert reject(es.token(iss=""), es) == "bad_issuer"
    # duplicate keys in the header JSON
    head = b64(b'{"alg":"ES256","kid":"k1","kid":"k2"}')
    _, body, sig = es.token().split(".")
    assert reject(f"{head}.{body}.{sig}", es) == "malformed"
    # empty signature
    head, body, _ = es.token().split(".")
    assert reject(f"{head}.{body}.", es) == "bad_signature"
    forged = [b64(json.dumps(h).encode()) + ".e30.eA" for h in ({"alg": "ES384", "kid": "k1"},)]
    assert reject(forged[0], es) == "alg_not_allowed"
    assert reject(b64(json.dumps({"kid": "k1"}).encode()) + ".e30.eA", es) == "malformed"


def test_certificate_binding(es: Signer) -> None:
    cert = b64(hashlib.sha256(b"leaf-der").digest())
    bound = es.token(cnf={"x5t#S256": cert})
    got = local(bound, es, certificate_thumbprint=cert)
    assert got.claims["cnf"] == {"x5t#S256": cert}
    other = b64(hashlib.sha256(b"other").digest())
    assert reject(bound, es, certificate_thumbprint=other) == "binding_mismatch"
    assert reject(es.token(), es, certificate_thumbprint=cert) == "binding_mismatch"
    assert reject(bound, es) == "binding_mismatch"  # bound token, no certificate
    # a thumbprint without require_binding accepts an unbound token (bind: subject routes)
    local(es.token(), es, certificate_thumbprint=cert, require_binding=False)
    assert reject(es.token(), es, require_binding=True) == "binding_mismatch"
    assert reject(es.token(cnf="x"), es, certificate_thumbprint=cert) == "malformed"


@pytest.mark.parametrize(
    "token", ["", "abc", "a.b", "a.b.c.d", "!!!.@@@.###", "eyJhbGciOiJFUzI1NiJ9.e30"]
)
def test_junk_is_malformed(es: Signer, token: str) -> None:
    assert reject(token, es) == "malformed"


def test_oversized_token(es: Signer) -> None:
    big = es.token(pad="x" * MAX_TOKEN_BYTES)
    assert reject(big, es) == "too_large"


def test_payload_must_be_an_object(es: Signer) -> None:
    raw = jwt.api_jws.encode(b"[1,2]", es.private, algorithm="ES256", headers={"kid": "k1"})
    assert reject(raw, es) == "malformed"
