"""pki.jose: the strict JOSE primitives the signer and the gateway's local verifier share."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from svidgate.pki.jose import (
    ALGORITHMS,
    MAX_JSON_DEPTH,
    b64url_decode,
    b64url_encode,
    jws_algorithm,
    key_fits_algorithm,
    loads_strict,
)


@pytest.mark.parametrize("data", [b"", b"\x00", b"\xff\xfe", bytes(range(256))])
def test_b64url_round_trip_without_padding(data: bytes) -> None:
    text = b64url_encode(data)
    assert "=" not in text and "+" not in text and "/" not in text
    assert b64url_decode(text) == data


@pytest.mark.parametrize("text", ["AA==", "A", "AA+A", "AA/A", "AA A", "AAAAA", "Zm9v\n"])
def test_b64url_decode_refuses_padding_foreign_alphabet_and_bad_length(text: str) -> None:
    with pytest.raises(ValueError, match="not base64url"):
        b64url_decode(text)


def test_loads_strict_is_json_loads_but_refuses_duplicate_members() -> None:
    assert loads_strict(b'{"a": 1, "b": [1, {"c": null}]}') == {"a": 1, "b": [1, {"c": None}]}
    assert loads_strict('{"a": "\\u00e9"}') == {"a": "é"}
    assert loads_strict('{"a": 1}'.encode("utf-16")) == {"a": 1}  # json.loads detects it too
    for doc in ('{"a": 1, "a": 2}', '{"x": {"a": 1, "a": 1}}'):
        with pytest.raises(ValueError, match="duplicate JSON key 'a'"):
            loads_strict(doc)
    with pytest.raises(ValueError, match="BOM"):
        loads_strict('\ufeff{"a": 1}')
    with pytest.raises(ValueError):
        loads_strict(b"{'a': 1}")


def test_one_algorithm_per_key() -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    p384 = ec.generate_private_key(ec.SECP384R1())
    ed = ed25519.Ed25519PrivateKey.generate()
    rsa2048 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa1024 = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    for key in (p256, p256.public_key()):
        assert key_fits_algorithm("ES256", key)
        assert not key_fits_algorithm("EdDSA", key) and not key_fits_algorithm("RS256", key)
    assert not key_fits_algorithm("ES256", p384)
    assert key_fits_algorithm("EdDSA", ed) and key_fits_algorithm("EdDSA", ed.public_key())
    for alg in ("RS256", "PS256"):
        assert key_fits_algorithm(alg, rsa2048) and key_fits_algorithm(alg, rsa2048.public_key())
        assert not key_fits_algorithm(alg, rsa1024)
    for alg in ("HS256", "none", "ES384", ""):
        assert not key_fits_algorithm(alg, p256)


@pytest.mark.parametrize(
    "doc",
    ['{"a": NaN}', '{"a": Infinity}', '{"a": -Infinity}', "[NaN]", '{"a": 1e400}', "-1e999"],
)
def test_loads_strict_refuses_nan_infinity_and_float_overflow(doc: str) -> None:
    import json

    json.loads(doc)  # Python's json accepts every one of them
    with pytest.raises(ValueError):
        loads_strict(doc)
    with pytest.raises(ValueError):
        loads_strict(doc.encode())


def test_loads_strict_keeps_finite_numbers() -> None:
    assert loads_strict('{"a": 1.5e3, "b": -0.0, "c": 10, "d": 1e308}') == {
        "a": 1500.0,
        "b": -0.0,
        "c": 10,
        "d": 1e308,
    }


def test_loads_strict_refuses_deep_nesting_with_a_value_error() -> None:
    limit = MAX_JSON_DEPTH
    assert loads_strict("[" * limit + "]" * limit) is not None
    assert loads_strict('{"a": ' * (limit - 1) + "1" + "}" * (limit - 1)) is not None
    for depth in (limit + 1, 500, 999, 5_000, 100_000):
        with pytest.raises(ValueError, match="nested"):
            loads_strict("[" * depth + "]" * depth)
    with pytest.raises(ValueError):
        loads_strict("[" * 100_000)  # unbalanced as well
    with pytest.raises(ValueError, match="nested"):
        loads_strict('{"a": ' * (limit + 1) + "1" + "}" * (limit + 1))
    # brackets inside strings are not nesting
    assert loads_strict(json_text := '{"a": "' + "[" * 1000 + '"}') == {"a": "[" * 1000}
    assert len(json_text) > 1000


@pytest.mark.parametrize("alg", ["none", "HS256", "ES384", "RS512", ""])
def test_jws_algorithm_only_for_the_allowed_ones(alg: str) -> None:
    with pytest.raises(ValueError, match="not allowed"):
        jws_algorithm(alg)
    for allowed in ALGORITHMS:
        assert jws_algorithm(allowed) is jws_algorithm(allowed)
